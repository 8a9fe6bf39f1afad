"""Compile the Triton kernels for a GPU on a machine without one, and report what each build costs.

Every kernel specialization that the CIFAR ResNet-1001 triples launch (forward with and without
residual and statistics, dgrad with its BN epilogue, wgrad, the BN kernels), with every tile
configuration the autotuner may pick for that shape, in float32 (exact and TF32), bfloat16 and
float16, is compiled to a cubin for the requested architectures. The launch arguments come from the
backend's own Python wrappers called on ``meta`` tensors, so the specializations are the real ones.
Each build reports its registers, its stack (register spills land there) and its shared memory.

Kernels decorated under ``TRITON_INTERPRET=1`` cannot be compiled, so this runs as a script:

    python tests/triton_aot.py --arch 90 --json report.json

tests/test_triton_compile.py runs it on CPU and checks: every build succeeds, none spills, and each
fits the architecture's shared memory per block.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

# Shared memory one block may opt into (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

DTYPES = {"float32": "ieee", "float32-tf32": "tf32", "bfloat16": None, "float16": None}


@contextmanager
def recorded_launches():
    """Inside: launching a Triton kernel records (jit function, keyword arguments, configurations).

    An autotuned kernel records the configurations its ``early_config_prune`` keeps for the
    arguments (all of them without one); a plain launch records its own options.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches = []

    def autotuned(self, *args, **kwargs):
        assert not args, "the backend launches kernels with keyword arguments"
        configs = self.early_config_prune(self.configs, dict(kwargs)) if self.early_config_prune else self.configs
        launches.append((self.fn, dict(kwargs), [(c.kwargs, c.num_warps, c.num_stages) for c in configs]))
        self.best_config = configs[0]  # what the backend remembers as the choice for this problem

    def plain(self, *args, grid, warmup, **kwargs):
        kwargs.update(zip(self.arg_names, args))
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        launches.append((self, kwargs, [({}, options.get("num_warps", 4), options.get("num_stages", 3))]))

    saved = Autotuner.run, JITFunction.run
    Autotuner.run, JITFunction.run = autotuned, plain
    try:
        yield launches
    finally:
        Autotuner.run, JITFunction.run = saved


def resnet1001_launches(dtype_name: str, batch: int):
    """The kernel launches of one training step's triples of ResNet-1001 in dtype_name, recorded:
    the forward as the fused units issue it (stem: no BN, statistics of its output; conv1/conv2:
    the fold from the input's statistics with the running-statistic update, output statistics;
    conv3: the same plus the residual; projection shortcut: the fold of conv1's BN), the eval-mode
    forward (running statistics), dgrad, wgrad (with the next BN's backward for conv1 and conv2),
    bn_stats, bn_backward and bn_fold."""
    import torch

    from preact_fused.triton import bn_grad, conv, stats

    sys.path.insert(0, str(Path(__file__).parent))
    from preact_fused.shapes import RESNET1001_TRIPLES, triple_roles

    dtype = torch.float32 if dtype_name.startswith("float32") else getattr(torch, dtype_name)
    tf32 = dtype_name == "float32-tf32"

    def act(c, hw):
        return torch.empty(batch, c, hw, hw, dtype=dtype, device="meta").to(memory_format=torch.channels_last)

    def vec(*shape):
        return torch.empty(*shape, dtype=torch.float32, device="meta")

    nbt = torch.empty((), dtype=torch.int64, device="meta")
    with recorded_launches() as launches:
        for name, cin, cout, hw, k, stride in RESNET1001_TRIPLES:
            pad = k // 2
            ohw = (hw + 2 * pad - k) // stride + 1
            x, dy, w = act(cin, hw), act(cout, ohw), torch.empty(cout, cin, k, k, device="meta")
            preact = name != "stem"
            residual = act(cout, ohw) if name.endswith("conv3") else None
            affine = dict(gamma=vec(cin), beta=vec(cin))
            running = dict(running_mean=vec(cin), running_var=vec(cin), num_batches_tracked=nbt)
            if not preact:
                conv.conv_fwd(x, w, stride, pad, want_stats=True, tf32=tf32)
            elif name.endswith("shortcut"):
                conv.conv_fwd(x, w, stride, pad, fold=vec(4, cin), tf32=tf32)
            else:
                momentum = None if name == "s1.conv2" else 0.1
                conv.conv_fwd(x, w, stride, pad, stats=vec(4, cin), **affine, **running, momentum=momentum,
                              update_running=True, residual=residual, want_stats=True, tf32=tf32)
            if preact:  # eval mode
                conv.conv_fwd(x, w, stride, pad, **affine, running_mean=vec(cin), running_var=vec(cin),
                              residual=residual, tf32=tf32)
            fold = vec(4, cin) if preact else None
            conv.conv_dgrad(dy, w, x, stride, pad, fold, tf32=tf32)
            conv.conv_wgrad(x, dy, w, stride, pad, fold, tf32=tf32)
            if triple_roles(name)["next_bn"]:  # the wgrad that computes the next BN's backward
                for training in (True, False):
                    conv.conv_wgrad_bn_backward(x, dy, w, stride, pad, fold, act(cout, ohw), vec(4, cout),
                                                vec(3, cout), 1000.0, training, tf32=tf32)
            stats.bn_stats(x)
            for training in (True, False):
                bn_grad.bn_backward(x, x, vec(4, cin), vec(3, cin), 1000.0, training, None if training else x)
        c = 64
        stats.bn_fold(vec(4, c), vec(c), vec(c), vec(c), vec(c), nbt, 1e-5, 0.1, True)
        stats.bn_fold(vec(4, c), None, None, vec(c), vec(c), nbt, 1e-5, None, True)
        stats.bn_fold(None, vec(c), vec(c), vec(c), vec(c), None, 1e-5, 0.1, False)
    return launches


def _arg_type(value):
    """Triton's own specialization of a runtime argument, as its launcher computes it: (type, key)
    with key 'D' when divisible by 16 (pointers: 16-byte aligned), or ('constexpr', 1)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(BaseBackend, value, False, True, True)


def build_jobs(launches, dtype_name: str, archs):
    """Distinct (kernel, signature, constants, options, arch) builds of the recorded launches."""
    jobs = {}
    for fn, kwargs, configs in launches:
        for config, num_warps, num_stages in configs:
            constants, signature, aligned = {}, {}, []
            for name in fn.arg_names:
                param = fn.params[fn.arg_names.index(name)]
                value = {**kwargs, **config}[name]
                if param.is_constexpr:
                    signature[name], constants[name] = "constexpr", value
                    continue
                kind = _arg_type(value)
                if kind[0] == "constexpr":
                    signature[name], constants[name] = "constexpr", kind[1]
                else:
                    signature[name] = kind[0]
                    if kind[1] == "D":
                        aligned.append(name)
            for arch in archs:
                key = (fn.__name__, json.dumps(signature), json.dumps(constants, sort_keys=True),
                       tuple(aligned), num_warps, num_stages, arch)
                jobs[key] = dict(kernel=f"{fn.fn.__module__}.{fn.__name__}", dtype=dtype_name, arch=arch,
                                 signature=signature, constants=constants, aligned=aligned,
                                 num_warps=num_warps, num_stages=num_stages)
    return list(jobs.values())


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack bytes and static shared bytes of a cubin's kernel (cuobjdump -res-usage)."""
    from triton.backends.nvidia import compiler as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(item.split(":") for item in line.split())
    return dict(registers=int(fields["REG"]), stack=int(fields["STACK"]), static_shared=int(fields["SHARED"]))


def compile_job(job: dict) -> dict:
    """Compile one build; the job with its resources (or its error) added."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module, name = job["kernel"].rsplit(".", 1)
    kernel = getattr(importlib.import_module(module), name)
    fn = kernel
    while not isinstance(fn, JITFunction):  # an Autotuner wraps the JITFunction
        fn = fn.fn
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in job["aligned"]}
    source = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constants"], attrs=attrs)
    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", job["arch"], 32),
                                  options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    except Exception as error:  # reported, and the check fails on it
        return {**job, "error": f"{type(error).__name__}: {error}"[:2000]}
    usage = _resource_usage(compiled.asm["cubin"])
    return {**job, **usage, "shared": compiled.metadata.shared, "seconds": round(time.perf_counter() - start, 2)}


def summary(report: list[dict]) -> str:
    """One line per failed, spilling or over-shared build, and a count."""
    lines = []
    for r in report:
        c = r["constants"]
        what = (f"{r['kernel'].rsplit('.', 1)[1]} {r['dtype']} sm_{r['arch']} "
                + " ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK") or v is True or k in ("KH", "STRIDE")))
        if "error" in r:
            lines.append(f"FAILED {what}: {r['error'].splitlines()[0]}")
        elif r["stack"] or r["shared"] > SHARED_LIMIT[r["arch"]]:
            lines.append(f"{what}: {r['registers']} registers, {r['stack']} stack bytes, {r['shared']} shared bytes")
    bad = len(lines)
    lines.append(f"{len(report)} builds, {bad} failed, spilling or over the shared-memory limit")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (default 90)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, help="write the full report here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

    jobs = [job for d in args.dtype for job in build_jobs(resnet1001_launches(d, args.batch), d, args.arch)]
    with ProcessPoolExecutor(args.jobs) as pool:
        report = list(pool.map(compile_job, jobs))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
