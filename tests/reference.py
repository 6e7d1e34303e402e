"""Slow, obviously-correct reference implementations (float64), one function per formula.

Fast paths in fsgeom are tested against these: per-example Python loops, dense Jacobians
from ``torch.autograd.functional.jacobian``, hand transcriptions of the paper's algorithms.
Nothing here is optimized; clarity is the point.
"""

import math

import torch
from torch import nn


def ref_outputs(model: nn.Module, x: torch.Tensor, output: str = "probs") -> torch.Tensor:
    """The model's outputs, one example at a time, in eval mode on a deep copy."""
    import copy

    m = copy.deepcopy(model).eval()
    rows = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            z = m(x[i : i + 1])[0]
            if output == "probs":
                z = torch.softmax(z, -1)
            elif output == "log_probs":
                z = torch.log_softmax(z, -1)
            rows.append(z)
    return torch.stack(rows)


def ref_l2_distance(model_a, model_b, x, output="probs", reduction="rms"):
    """sqrt(1/N Σ_i |f_a(x_i) − f_b(x_i)|²) or 1/N Σ_i |f_a(x_i) − f_b(x_i)|, by a loop."""
    fa, fb = ref_outputs(model_a, x, output), ref_outputs(model_b, x, output)
    total = 0.0
    for i in range(x.shape[0]):
        d = math.sqrt(sum(float(v) ** 2 for v in (fa[i] - fb[i]).reshape(-1)))
        total += d**2 if reduction == "rms" else d
    mean = total / x.shape[0]
    return math.sqrt(mean) if reduction == "rms" else mean


def ref_kl(model_a, model_b, x):
    """1/N Σ_i Σ_c p_a log(p_a / p_b), by a loop."""
    pa, pb = ref_outputs(model_a, x, "probs"), ref_outputs(model_b, x, "probs")
    total = 0.0
    for i in range(x.shape[0]):
        for c in range(pa.shape[1]):
            p, q = float(pa[i, c]), float(pb[i, c])
            total += p * math.log(p / q)
    return total / x.shape[0]


def ref_jacobian(model: nn.Module, x: torch.Tensor, output: str = "probs") -> torch.Tensor:
    """Dense Jacobian of the outputs w.r.t. the flat trainable parameters: (N, C, P).

    Built with ``torch.autograd.functional.jacobian`` on a deep copy in eval mode.
    """
    import copy

    m = copy.deepcopy(model).eval()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in m.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for n, p in m.named_parameters() if p.requires_grad])

    def f(flat):
        return _ref_optim_call(m, names, shapes, flat, x, output)

    return torch.autograd.functional.jacobian(f, theta)


def ref_parameter_distance(model_a, model_b):
    """Euclidean distance between the trainable parameters, element by element."""
    total = 0.0
    for (_, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        for u, v in zip(pa.detach().reshape(-1).tolist(), pb.detach().reshape(-1).tolist()):
            total += (u - v) ** 2
    return math.sqrt(total)


def ref_tracking_trajectory(model, states, probe, output="probs"):
    """The tracker's step quantities along a list of states, by loops (float64 Python).

    ``states``: ``state_dict`` copies θ_0, θ_1, … (buffers included, so BatchNorm running
    statistics count as part of the function). Returns a dict of lists, one entry per
    state: ``param_step_sq`` ‖θ_t − θ_{t−1}‖² (NaN at t = 0), ``function_step_sq``
    1/N Σ_i |f_t(x_i) − f_{t−1}(x_i)|² (NaN at 0), ``csdt_param`` / ``csdt_function``
    (sums of the former over 1..t), ``param_dist_init`` ‖θ_t − θ_0‖, ``function_dist_init``
    (1/N Σ_i |f_t(x_i) − f_0(x_i)|²)^{1/2} and ``param_step_sq_tensor`` (a dict per state).
    """
    import copy

    nets = []
    for s in states:
        m = copy.deepcopy(model)
        m.load_state_dict(s)
        nets.append(m)
    out = {
        k: []
        for k in (
            "param_step_sq",
            "function_step_sq",
            "csdt_param",
            "csdt_function",
            "param_dist_init",
            "function_dist_init",
            "param_step_sq_tensor",
        )
    }
    cp = cf = 0.0
    for t, m in enumerate(nets):
        if t == 0:
            ps = fs = math.nan
            per = {n: math.nan for n, _ in m.named_parameters()}
        else:
            prev = nets[t - 1]
            ps = ref_parameter_distance(m, prev) ** 2
            fs = ref_l2_distance(m, prev, probe, output, "rms") ** 2
            per = {}
            for (n, a), (_, b) in zip(m.named_parameters(), prev.named_parameters()):
                per[n] = sum(
                    (u - v) ** 2 for u, v in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())
                )
            cp += ps
            cf += fs
        out["param_step_sq"].append(ps)
        out["function_step_sq"].append(fs)
        out["csdt_param"].append(cp)
        out["csdt_function"].append(cf)
        out["param_dist_init"].append(ref_parameter_distance(m, nets[0]))
        out["function_dist_init"].append(ref_l2_distance(m, nets[0], probe, output, "rms"))
        out["param_step_sq_tensor"].append(per)
    return out


# --- optimizers (fsgeom.optim): hand transcriptions of the paper's Algorithms 1 and 2 ------


def _ref_optim_setup(model):
    """Deep copy in eval mode, its trainable names/shapes, θ as one flat float vector."""
    import copy

    m = copy.deepcopy(model).eval()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in m.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for n, p in m.named_parameters() if p.requires_grad])
    return m, names, shapes, theta


def _ref_optim_call(m, names, shapes, flat, x, output):
    """f(x) of module ``m`` at the flat parameter vector ``flat``, in ``output`` space."""
    from torch.func import functional_call

    params, i = {}, 0
    for n, s in zip(names, shapes):
        k = math.prod(s)
        params[n] = flat[i : i + k].reshape(s)
        i += k
    z = functional_call(m, params, (x,))
    if output == "probs":
        z = torch.softmax(z, -1)
    elif output == "log_probs":
        z = torch.log_softmax(z, -1)
    return z


def _ref_optim_loss_grad(m, names, shapes, theta, x, y):
    t = theta.detach().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(_ref_optim_call(m, names, shapes, t, x, "logits"), y)
    return torch.autograd.grad(loss, t)[0]


def _ref_optim_hilbert_grad(m, names, shapes, theta, delta, x, lam, output, distance):
    """∇_Δθ of (λ²/N Σ_i |f_θ(x_i) − f_{θ+Δθ}(x_i)|²)^{1/2} (Eq. 7), or λ/N Σ_i |…|."""
    f_ref = _ref_optim_call(m, names, shapes, theta, x, output).detach()
    d = delta.detach().clone().requires_grad_(True)
    diff = f_ref - _ref_optim_call(m, names, shapes, theta + d, x, output)
    n = x.shape[0]
    if distance == "rms":
        value = torch.sqrt(lam**2 / n * (diff**2).sum())
    else:
        value = lam * torch.stack([torch.sqrt((diff[i] ** 2).sum()) for i in range(n)]).mean()
    return torch.autograd.grad(value, d)[0]


def ref_optim_hcgd(
    model,
    train,
    val,
    lr,
    momentum,
    lam,
    inner_lr,
    n,
    output="probs",
    distance="rms",
    weight_decay=0.0,
):
    """Algorithm 1 line by line on a flat θ; returns θ after len(train) steps.

    train: list of (x, y); val[t]: the validation batch of step t, or a list of n batches
    (one per correction) when redrawn; lr: a number or a list (one per step).
    """
    m, names, shapes, theta = _ref_optim_setup(model)
    v = torch.zeros_like(theta)
    for t, (x, y) in enumerate(train):
        eps = lr[t] if isinstance(lr, (list, tuple)) else lr
        J = _ref_optim_loss_grad(m, names, shapes, theta, x, y) + weight_decay * theta  # line 7
        v = momentum * v + eps * J  # line 8
        delta = -v  # line 9
        xs = val[t] if isinstance(val[t], list) else [val[t]] * n  # line 10
        g = _ref_optim_hilbert_grad(m, names, shapes, theta, delta, xs[0], lam, output, distance)
        delta = delta - inner_lr * g  # line 12
        v = v + inner_lr * g  # line 13
        for j in range(2, n + 1):  # line 14 (the further corrections)
            g = J + _ref_optim_hilbert_grad(
                m, names, shapes, theta, delta, xs[j - 1], lam, output, distance
            )  # line 15
            delta = delta - inner_lr * g  # line 16
            v = v + inner_lr * g  # line 17
        theta = theta + delta  # line 18
    return theta


def ref_optim_hilbert_constrained(
    model, make_base, train, val, lam, inner_lr, n, output="probs", distance="rms"
):
    """Δθ₀ = the step of a torch optimizer (make_base(params)) on a copy; then the same
    corrections as Algorithm 1 (first: λD only, then J + λD); the base's state is not
    corrected. Returns θ after len(train) steps."""
    import copy

    work = copy.deepcopy(model)
    params = [p for p in work.parameters() if p.requires_grad]
    base = make_base(params)
    m, names, shapes, _ = _ref_optim_setup(model)
    for t, (x, y) in enumerate(train):
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        J = _ref_optim_loss_grad(m, names, shapes, theta, x, y)
        i = 0
        for p in params:  # the gradient the base optimizer sees
            p.grad = J[i : i + p.numel()].reshape(p.shape).clone()
            i += p.numel()
        base.step()
        delta = torch.cat([p.detach().reshape(-1) for p in params]) - theta
        g = _ref_optim_hilbert_grad(m, names, shapes, theta, delta, val[t], lam, output, distance)
        delta = delta - inner_lr * g
        for _ in range(2, n + 1):
            g = J + _ref_optim_hilbert_grad(
                m, names, shapes, theta, delta, val[t], lam, output, distance
            )
            delta = delta - inner_lr * g
        new = theta + delta
        i = 0
        with torch.no_grad():
            for p in params:
                p.copy_(new[i : i + p.numel()].reshape(p.shape))
                i += p.numel()
    return torch.cat([p.detach().reshape(-1) for p in params])


def ref_optim_fisher(model, x, y=None):
    """Dense Fisher by a per-example loop: 1/N Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i (J_i the
    logit Jacobian); with labels y, the empirical Fisher 1/N Σ_i g_i g_iᵀ,
    g_i = J_iᵀ(p_i − e_yi)."""
    jac = ref_jacobian(model, x, "logits")  # (N, C, P)
    p = ref_outputs(model, x, "probs")
    n, c, _ = jac.shape
    total = torch.zeros(jac.shape[2], jac.shape[2], dtype=jac.dtype)
    for i in range(n):
        if y is None:
            m = torch.diag(p[i]) - torch.outer(p[i], p[i])
            total += jac[i].T @ m @ jac[i]
        else:
            g = jac[i].T @ (p[i] - nn.functional.one_hot(y[i], c).to(p.dtype))
            total += torch.outer(g, g)
    return total / n


def ref_optim_ngd(model, make_base, train, fisher_batches, lam, inner_lr, n):
    """Algorithm 2 line by line: Δθ₀ from a torch optimizer (on a copy), then n times
    Δθ ← Δθ − η (J + λ F Δθ) with the dense F of ref_optim_fisher at θ_t on
    fisher_batches[t] (inputs: Fisher; (inputs, labels): empirical Fisher)."""
    import copy

    work = copy.deepcopy(model)
    params = [p for p in work.parameters() if p.requires_grad]
    base = make_base(params)
    m, names, shapes, _ = _ref_optim_setup(model)
    for t, (x, y) in enumerate(train):
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        fb = fisher_batches[t]
        F = ref_optim_fisher(work, *fb) if isinstance(fb, tuple) else ref_optim_fisher(work, fb)
        J = _ref_optim_loss_grad(m, names, shapes, theta, x, y)
        i = 0
        for p in params:
            p.grad = J[i : i + p.numel()].reshape(p.shape).clone()
            i += p.numel()
        base.step()  # line 4
        delta = torch.cat([p.detach().reshape(-1) for p in params]) - theta
        for _ in range(n):  # line 5
            delta = delta - inner_lr * (J + lam * F @ delta)  # line 6
        new = theta + delta  # line 7
        i = 0
        with torch.no_grad():
            for p in params:
                p.copy_(new[i : i + p.numel()].reshape(p.shape))
                i += p.numel()
    return torch.cat([p.detach().reshape(-1) for p in params])


# ---------------------------------------------------------------------------------------
# curvature (issue 3): dense L² metric, Fisher and empirical Fisher, by loops


def ref_curv_output_matrix(z_i: torch.Tensor, kind: str, sigma: float = 1.0) -> torch.Tensor:
    """The C×C output-space matrix M_i of one example from its logits z_i, written out.

    ``"logits"``: I; ``"probs"``: S S with S = diag(p) − ppᵀ (J_p = S J_z);
    ``"log_probs"``: AᵀA with A = I − 1pᵀ (J_logp = A J_z); ``"fisher"``: S;
    ``"gaussian"``: I/σ².
    """
    c = z_i.shape[0]
    p = torch.softmax(z_i, 0)
    eye = torch.eye(c, dtype=z_i.dtype)
    s = torch.zeros(c, c, dtype=z_i.dtype)
    for a in range(c):
        for b in range(c):
            s[a, b] = (p[a] if a == b else 0.0) - p[a] * p[b]
    if kind == "logits":
        return eye
    if kind == "probs":
        return s @ s
    if kind == "log_probs":
        a_mat = eye - torch.ones(c, 1, dtype=z_i.dtype) @ p[None, :]
        return a_mat.T @ a_mat
    if kind == "fisher":
        return s
    if kind == "gaussian":
        return eye / sigma**2
    raise ValueError(kind)


def ref_curv_ggn(model: nn.Module, x: torch.Tensor, kind: str, sigma: float = 1.0):
    """Dense 1/N Σ_i J_iᵀ M_i J_i (P×P) from ``ref_jacobian`` on the logits, by a loop."""
    jac = ref_jacobian(model, x, "logits")  # (N, C, P)
    z = ref_outputs(model, x, "logits")
    n, _, p = jac.shape
    total = torch.zeros(p, p, dtype=jac.dtype)
    for i in range(n):
        total += jac[i].T @ ref_curv_output_matrix(z[i], kind, sigma) @ jac[i]
    return total / n


def ref_curv_l2_metric_direct(model: nn.Module, x: torch.Tensor, output: str = "probs"):
    """1/N Σ_i J_iᵀ J_i with J_i the Jacobian of the outputs in ``output`` space itself."""
    jac = ref_jacobian(model, x, output)  # (N, C, P)
    n = jac.shape[0]
    return sum(jac[i].T @ jac[i] for i in range(n)) / n


def ref_curv_per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss):
    """(N, P) per-example loss gradients, one ``autograd.grad`` per example on a copy.

    ``loss(output_i, target_i) -> scalar`` for one example (output_i of shape (C,)).
    """
    import copy

    m = copy.deepcopy(model).eval()
    params = [p for p in m.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = m(x[i : i + 1])[0]
        grads = torch.autograd.grad(loss(out, y[i]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def ref_curv_empirical_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss):
    """1/N Σ_i g_i g_iᵀ from ``ref_curv_per_example_grads``."""
    g = ref_curv_per_example_grads(model, x, y, loss)
    total = torch.zeros(g.shape[1], g.shape[1], dtype=g.dtype)
    for i in range(g.shape[0]):
        total += torch.outer(g[i], g[i])
    return total / g.shape[0]
