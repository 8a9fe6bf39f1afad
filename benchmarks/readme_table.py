"""Rewrite the README's measured figures from committed results: never typed by hand.

    python -m benchmarks.readme_table [--results benchmarks/results] [--readme README.md] [--check]

Each section of the README between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` is generated:

* ``gpu-results``: for every GPU folder under ``--results`` (any folder but ``cpu`` and ``local``),
  its ``resnet1001.json`` (the main benchmark at batch 128: images/s and peak memory per variant,
  loss check), ``sweep.json`` (the headline: images/s at the largest batch eager AMP fits, and each
  variant's largest batch), ``kernel_ops.json`` (network totals per backend, cuDNN's fused patterns
  included) and ``launches.json`` (the CUDA profiler's kernel count per unit and step). Rows marked
  invalid (their backend failed the correctness smoke) are left out and counted. Without GPU results
  the section says so.
* ``cpu-launches`` and ``cpu-host-overhead``: ``cpu/launches.json`` (``python -m benchmarks.launches``)
  and ``cpu/host_overhead.json`` (``python -m benchmarks.host_overhead``), each with the command and
  machine that produced it.

``--check`` exits 1 when the README is not what the results generate (for CI), writing nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import RESULTS

def markers(name: str) -> tuple[str, str]:
    """The comments around the README's generated section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


BEGIN, END = markers("gpu-results")
README = Path(__file__).resolve().parents[1] / "README.md"


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def gpu_section(results: Path) -> str:
    folders = sorted(p for p in results.iterdir() if p.is_dir() and p.name not in ("cpu", "local"))
    parts = []
    for folder in folders:
        main, sweep, kernels, launches = (_load(folder / n) for n in ("resnet1001.json", "sweep.json",
                                                                     "kernel_ops.json", "launches.json"))
        if not (main or sweep or kernels or launches):
            continue
        env = (main or sweep or launches or {}).get("environment", {})
        parts.append(f"**{env.get('device_name', folder.name)}** (`benchmarks/results/{folder.name}/`; torch "
                     f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, {env.get('date', '?')}):")
        if main:
            rows = [r for r in main["rows"] if not r.get("error")]
            invalid = [r for r in rows if r.get("invalid")]
            lines = ["| variant | backend | dtype | graphed | batch | img/s | peak MiB | kernels/step | loss rel diff |",
                     "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in rows:
                if r.get("invalid"):
                    continue
                diff = "-" if r.get("loss_rdiff") is None else f"{r['loss_rdiff']:.1e}" + (" DRIFT" if r.get("drift") else "")
                lines.append(f"| {r['variant']} | {r['backend']} | {r['dtype']} | {'yes' if r.get('graphed') else 'no'} "
                             f"| {r['batch']} | {r['images_per_s']:.0f} | {_mib(r.get('peak_alloc_bytes'))} "
                             f"| {r.get('kernels_per_step') or '-'} | {diff} |")
            parts.append("\n".join(lines))
            if invalid:
                parts.append(f"{len(invalid)} rows left out: invalid ({invalid[0]['invalid']}).")
        if sweep and sweep.get("headline"):
            head = sweep["headline"]
            lines = [f"Batch sweep: images/s at batch {head.get('batch')} (the largest {head.get('reference')} "
                     "fits) and the largest batch of each variant:", "",
                     "| variant | img/s at that batch | vs reference | largest batch |", "| --- | --- | --- | --- |"]
            for name, e in head.get("variants", {}).items():
                ips = "-" if e.get("images_per_s") is None else f"{e['images_per_s']:.0f}"
                ratio = "-" if e.get("vs_reference") is None else f"{e['vs_reference']:.2f}x"
                lines.append(f"| {name} | {ips} | {ratio} | {e.get('max_batch', '-')} |")
            parts.append("\n".join(lines))
        if kernels:
            from .kernel_ops import network_totals
            totals = network_totals([r for r in kernels["rows"] if not r.get("invalid")])
            unsupported = [r for r in kernels["rows"] if r.get("unsupported")]
            lines = ["Kernel level, all triples of one ResNet-1001 step (count x median):", "",
                     "| backend | fused ms | eager ms | speed-up | x min-bytes time |", "| --- | --- | --- | --- | --- |"]
            for backend, t in totals.items():
                lines.append(f"| {backend} | {t['fused_ms']:.2f} | {t['eager_ms']:.2f} | {t['speedup']:.2f} | "
                             f"{t['x_min_bytes']:.2f} |")
            parts.append("\n".join(lines))
            if unsupported:
                parts.append(f"cuDNN could not build {len(unsupported)} triple patterns, e.g. "
                             f"{unsupported[0]['triple']}: {unsupported[0]['unsupported'][:160]}")
        if launches:
            from .launches import table
            parts.append(f"Kernel launches, CUDA profiler (`{launches.get('command', '?')}`):\n\n"
                         f"{table(launches['rows'])}")
    if not parts:
        return ("**No GPU figures have been measured yet.** `bash benchmarks/gpu_check.sh OUTDIR` produces them; "
                "copy OUTDIR's `bench/resnet1001.json`, `sweep/sweep.json`, `kernels/kernel_ops.json` and "
                "`launches/launches.json` to `benchmarks/results/<gpu>/` and run `python -m benchmarks.readme_table`.")
    return "\n\n".join(parts)


def _cpu_record_section(results: Path, name: str, table) -> str:
    """The table of the CPU record ``cpu/NAME.json`` with the command and machine that produced it."""
    record = _load(results / "cpu" / f"{name}.json")
    if record is None:
        return f"**Not measured yet:** no `benchmarks/results/cpu/{name}.json`."
    env = record["environment"]
    return (f"`{record.get('command', '?')}` on {env.get('device_name', '?')} ({env.get('cpu_count', '?')} cores; "
            f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, {env.get('date', '?')}):\n\n"
            f"{table(record['rows'])}")


def launches_section(results: Path) -> str:
    from .launches import table
    return _cpu_record_section(results, "launches", table)


def host_overhead_section(results: Path) -> str:
    from .host_overhead import table
    return _cpu_record_section(results, "host_overhead", table)


SECTIONS = {"gpu-results": gpu_section, "cpu-launches": launches_section, "cpu-host-overhead": host_overhead_section}


def render(readme_text: str, section: str, name: str = "gpu-results") -> str:
    begin, end = markers(name)
    if begin not in readme_text or end not in readme_text:
        raise ValueError(f"the README has no {begin} ... {end} section")
    head, rest = readme_text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{section}\n{end}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date; write nothing")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new = text
    for name, section in SECTIONS.items():
        new = render(new, section(args.results), name)
    if args.check:
        return 0 if new == text else 1
    args.readme.write_text(new)
    print(f"rewrote the generated sections of {args.readme}: {', '.join(SECTIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
