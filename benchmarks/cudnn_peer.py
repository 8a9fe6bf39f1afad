"""cuDNN's own BN-ReLU-conv fusion, the peer of the fused backends in ``benchmarks.kernel_ops``.

cuDNN fuses the same triple through its graph API (NVIDIA's ``nvidia-cudnn-frontend`` package,
``import cudnn``): the BN affine and the ReLU in the convolution's loader with the next BN's
statistics generated in its epilogue (forward: scale -> bias -> relu -> conv_fprop [-> add
residual] -> genstats); dgrad with the ReLU's backward and the BN-backward sums in its epilogue
(conv_dgrad -> relu_backward against the recomputed pre-activation -> sums of g and g*x); wgrad
recomputing the activation in its loader (scale -> bias -> relu -> conv_wgrad). These patterns
are fp16-only and NHWC-only in cuDNN, so the peer runs in fp16, channels_last, whatever dtype the
other rows use. What the Python API has no node for is done with torch on per-channel vectors
(the finalize of the statistics into scale/shift, the BN-backward coefficients) and, if cuDNN
refuses a pointwise-only graph, the elementwise dx = A*g + B*x + C.

Each pattern is built once per triple (heuristics A then FALLBACK); one that cuDNN cannot build on
this GPU leaves its reason in ``reasons`` and the row says why instead of a time.
"""
from __future__ import annotations

import torch

EPS = 1e-5
DTYPE = torch.float16


def unavailable_reason() -> str | None:
    """Why the cuDNN peer cannot run here, or None."""
    try:
        import cudnn  # noqa: F401
    except Exception as err:   # ImportError, or the library failing to load
        return (f"nvidia-cudnn-frontend not importable ({type(err).__name__}: {err}); "
                "bash benchmarks/download_wheels.sh fetches it for an offline machine")
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


class _Failed(Exception):
    """A pattern cuDNN did not build; the message says at which stage and why."""


def _build(cudnn, graph) -> None:
    stage = "validate"
    try:
        graph.validate()
        stage = "build_operation_graph"
        graph.build_operation_graph()
        stage = "create_execution_plans"
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        stage = "check_support"
        graph.check_support()
        stage = "build_plans"
        graph.build_plans()
    except Exception as err:   # cudnnGraphNotSupportedError, or cudnnException from an earlier stage
        raise _Failed(f"{stage}: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from err


class CudnnTriple:
    """One ResNet-1001 triple in cuDNN's fused patterns: inputs, built graphs and timed closures.

    ``cudnn`` and ``handle`` are injectable (tests pass a stand-in module); ``device`` defaults to
    the GPU."""

    def __init__(self, name, cin, cout, hw, k, stride, batch, cudnn=None, handle=None, device="cuda"):
        if cudnn is None:
            import cudnn
        self.cudnn, self.name = cudnn, name
        self.with_bn = name != "stem"
        self.with_residual = name.endswith("conv3")
        self.want_stats = not name.endswith("shortcut")
        self.stride, self.padding = stride, k // 2
        ho = (hw + 2 * self.padding - k) // stride + 1
        cl = torch.channels_last
        self.m = batch * hw * hw

        def act(*shape):
            return torch.randn(*shape, device=device, dtype=DTYPE).contiguous(memory_format=cl)

        self.x = act(batch, cin, hw, hw) * 2 + 0.5
        self.dy = act(batch, cout, ho, ho)
        self.residual = act(batch, cout, ho, ho) if self.with_residual else None
        self.w = (torch.randn(cout, cin, k, k, device=device, dtype=DTYPE) / k).contiguous(memory_format=cl)
        self.y = torch.empty_like(self.dy)
        self.g = torch.empty_like(self.x)
        self.dx = torch.empty_like(self.x)
        self.dw = torch.empty_like(self.w)
        vec = dict(device=device, dtype=torch.float32)
        self.gamma, self.beta = torch.rand(cin, **vec) + 0.5, torch.randn(cin, **vec)
        self.mean, self.invstd = self.x.float().mean((0, 2, 3)), torch.rand(cin, **vec) + 0.5
        # The input's statistics as the previous conv's epilogue left them (sum and sum of squares).
        self.in_sum = self.x.float().sum((0, 2, 3)).view(1, cin, 1, 1)
        self.in_sq = self.x.float().square().sum((0, 2, 3)).view(1, cin, 1, 1)
        self.out_sum = torch.empty(1, cout, 1, 1, **vec)
        self.out_sq = torch.empty(1, cout, 1, 1, **vec)
        self.sum_g = torch.empty(1, cin, 1, 1, **vec)
        self.sum_gx = torch.empty(1, cin, 1, 1, **vec)
        self.coef = [torch.ones(1, cin, 1, 1, **vec) for _ in range(3)]   # dx = A*g + B*x + C
        self.handle = handle if handle is not None else cudnn.create_handle()
        self.device = device
        self.reasons: dict[str, str] = {}
        self.plans: dict[str, tuple] = {}
        self.patterns: dict[str, str] = {}     # stage -> the pattern that was built
        for stage, builders in (("fwd", self._fwd_builders()), ("dgrad", self._dgrad_builders()),
                                ("wgrad", [("sbr_wgrad" if self.with_bn else "wgrad", self._wgrad)]),
                                ("dx", [("pointwise_dx", self._dx)] if self.with_bn else [])):
            for pattern, builder in builders:
                try:
                    self.plans[stage] = builder()
                    self.patterns[stage] = pattern
                    self.reasons.pop(stage, None)
                    break
                except _Failed as err:
                    self.reasons[stage] = f"{pattern}: {err}"
        if self.with_bn and "dx" not in self.plans:
            self.patterns["dx"] = "torch elementwise (cuDNN built no pointwise graph: "
            self.patterns["dx"] += self.reasons.pop("dx", "?") + ")"

    # -- graph construction ------------------------------------------------------------------------
    def _graph(self):
        c = self.cudnn
        return c.pygraph(io_data_type=c.data_type.HALF, intermediate_data_type=c.data_type.FLOAT,
                         compute_data_type=c.data_type.FLOAT, handle=self.handle)

    @staticmethod
    def _t(graph, name, tensor):
        return graph.tensor(name=name, dim=list(tensor.shape), stride=list(tensor.stride()), data_type=tensor.dtype)

    def _out(self, node, tensor, float_out=False):
        node.set_output(True).set_dim(list(tensor.shape)).set_stride(list(tensor.stride()))
        node.set_data_type(self.cudnn.data_type.FLOAT if float_out else self.cudnn.data_type.HALF)

    def _conv_args(self):
        return dict(padding=[self.padding] * 2, stride=[self.stride] * 2, dilation=[1, 1])

    def _activation(self, g, X, sb_dtype):
        """relu(x * scale + shift) in the loader; scale and shift [1, C, 1, 1] of ``sb_dtype``."""
        self.scale = torch.ones(1, self.x.shape[1], 1, 1, device=self.device, dtype=sb_dtype)
        self.shift = torch.zeros_like(self.scale)
        S, B = self._t(g, "scale", self.scale), self._t(g, "shift", self.shift)
        pre = g.bias(input=g.scale(input=X, scale=S), bias=B)
        return pre, S, B

    def _fwd_builders(self):
        if not self.with_bn:
            return [("conv_genstats", lambda: self._fwd(None))]
        return [("sbr_conv_genstats", lambda: self._fwd(torch.float32)),
                ("sbr_conv_genstats (fp16 scale/shift)", lambda: self._fwd(torch.float16))]

    def _fwd(self, sb_dtype):
        g = self._graph()
        X, W = self._t(g, "x", self.x), self._t(g, "w", self.w)
        pack = {X: self.x, W: self.w}
        image = X
        if sb_dtype is not None:
            pre, S, B = self._activation(g, X, sb_dtype)
            image = g.relu(input=pre)
            pack.update({S: self.scale, B: self.shift})
            self.fwd_scale, self.fwd_shift = self.scale, self.shift   # what finalize writes
        Y = g.conv_fprop(image=image, weight=W, **self._conv_args())
        if self.with_residual:
            R = self._t(g, "residual", self.residual)
            Y = g.add(a=Y, b=R)
            pack[R] = self.residual
        self._out(Y, self.y)
        pack[Y] = self.y
        if self.want_stats:
            SUM, SQ = g.genstats(input=Y)
            self._out(SUM, self.out_sum, float_out=True)
            self._out(SQ, self.out_sq, float_out=True)
            pack.update({SUM: self.out_sum, SQ: self.out_sq})
        _build(self.cudnn, g)
        return g, pack, self._workspace(g)

    def _dgrad_builders(self):
        if not self.with_bn:
            return [("dgrad", lambda: self._dgrad(sums=False, drelu=False))]
        return [("dgrad_drelu_bnsums", lambda: self._dgrad(sums=True, drelu=True)),
                ("dgrad_drelu (sums by torch)", lambda: self._dgrad(sums=False, drelu=True))]

    def _dgrad(self, sums: bool, drelu: bool):
        g = self._graph()
        DY, W = self._t(g, "dy", self.dy), self._t(g, "w", self.w)
        pack = {DY: self.dy, W: self.w}
        DA = g.conv_dgrad(loss=DY, filter=W, **self._conv_args())
        DA.set_dim(list(self.x.shape))
        G = DA
        if drelu:
            X = self._t(g, "x", self.x)
            pre, S, B = self._activation(g, X, torch.float16)
            G = g.relu_backward(loss=DA, input=pre)
            pack.update({X: self.x, S: self.scale, B: self.shift})
            if sums:
                SG = g.reduction(input=G, mode=self.cudnn.reduction_mode.ADD)
                SGX = g.reduction(input=g.mul(a=G, b=X), mode=self.cudnn.reduction_mode.ADD)
                self._out(SG, self.sum_g, float_out=True)
                self._out(SGX, self.sum_gx, float_out=True)
                pack.update({SG: self.sum_g, SGX: self.sum_gx})
        self._out(G, self.g)
        pack[G] = self.g
        self.dgrad_sums_fused = sums
        _build(self.cudnn, g)
        return g, pack, self._workspace(g)

    def _wgrad(self):
        g = self._graph()
        X, DY = self._t(g, "x", self.x), self._t(g, "dy", self.dy)
        pack = {X: self.x, DY: self.dy}
        image = X
        if self.with_bn:
            pre, S, B = self._activation(g, X, torch.float16)
            image = g.relu(input=pre)
            pack.update({S: self.scale, B: self.shift})
        DW = g.conv_wgrad(image=image, loss=DY, **self._conv_args())
        self._out(DW, self.dw)
        pack[DW] = self.dw
        _build(self.cudnn, g)
        return g, pack, self._workspace(g)

    def _dx(self):
        g = self._graph()
        G, X = self._t(g, "g", self.g), self._t(g, "x", self.x)
        A, Bc, C = (self._t(g, n, t) for n, t in zip("ABC", self.coef))
        DX = g.add(a=g.add(a=g.mul(a=G, b=A), b=g.mul(a=X, b=Bc)), b=C)
        self._out(DX, self.dx)
        _build(self.cudnn, g)
        return g, {G: self.g, X: self.x, A: self.coef[0], Bc: self.coef[1], C: self.coef[2], DX: self.dx}, \
            self._workspace(g)

    def _workspace(self, graph):
        return torch.empty(max(1, graph.get_workspace_size()), device=self.device, dtype=torch.uint8)

    # -- timed closures ----------------------------------------------------------------------------
    def _run(self, stage):
        graph, pack, workspace = self.plans[stage]
        graph.execute(pack, workspace, handle=self.handle)

    def runnable(self) -> str | None:
        """None when forward and backward can both be timed, else why not."""
        missing = [s for s in ("fwd", "dgrad", "wgrad") if s not in self.plans]
        if not missing:
            return None
        return "; ".join(f"{s}: {self.reasons.get(s, 'not built')}" for s in missing)

    def finalize(self):
        """The input's sums -> scale and shift (torch: the Python API has no bn_finalize node)."""
        mean = self.in_sum / self.m
        var = (self.in_sq / self.m - mean * mean).clamp_min_(0)
        scale = self.gamma.view_as(mean) * torch.rsqrt(var + EPS)
        self.fwd_scale.copy_(scale)
        self.fwd_shift.copy_(self.beta.view_as(mean) - mean * scale)

    def forward(self):
        if self.with_bn:
            self.finalize()
        self._run("fwd")

    def backward(self):
        self._run("dgrad")
        if self.with_bn:
            if not getattr(self, "dgrad_sums_fused", False):
                g = self.g.float()
                self.sum_g.copy_(g.sum((0, 2, 3)).view_as(self.sum_g))
                self.sum_gx.copy_((g * self.x.float()).sum((0, 2, 3)).view_as(self.sum_gx))
            # dx = A g + B x + C  (DESIGN.md section 1; sum_gx here is sum(g x): centre it)
            mean, invstd = self.mean.view_as(self.sum_g), self.invstd.view_as(self.sum_g)
            a = self.gamma.view_as(mean) * invstd
            sum_gxc = self.sum_gx - mean * self.sum_g
            b = -a * invstd * invstd * sum_gxc / self.m
            self.coef[0].copy_(a)
            self.coef[1].copy_(b)
            self.coef[2].copy_(-a * self.sum_g / self.m - b * mean)
            if "dx" in self.plans:
                self._run("dx")
            else:
                torch.addcmul(self.x * self.coef[1].to(DTYPE) + self.coef[2].to(DTYPE), self.g,
                              self.coef[0].to(DTYPE), out=self.dx)
        self._run("wgrad")
