"""docs/maths.md §2 written out plainly, one element at a time where that is clearer, for the tests.

Nothing here imports kintsugi_optim: these functions are the independent reference the library is
held against. They work on float64 tensors and favour obviousness over speed.
"""

from __future__ import annotations

import math

import torch


def fracture(grad: torch.Tensor, pathway: str) -> torch.Tensor:
    """§2.1 before the relative scaling: |g| reduced to the pathway."""
    a = grad.abs()
    if pathway == "element":
        return a.clone()
    if pathway == "row" and grad.dim() > 0:
        return torch.stack([a[i].mean() for i in range(grad.shape[0])])
    return a.mean()


def relative(l: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(l.dtype).tiny
    return l / max(l.abs().mean().item(), tiny)


def gild(phi, l, rho, *, beta, gamma, l1, phi_min, phi_max, phi_norm, ascent, positivity):
    """§2.2 over one scope (a 1-D or n-D tensor), returning new (phi, rho)."""
    phi, l = phi.double().flatten(), l.double().flatten()
    rho = None if rho is None else rho.double().flatten()
    new_phi, new_rho = phi.clone(), None if rho is None else rho.clone()
    upper = phi_max if phi_max is not None else torch.finfo(torch.float64).max
    for i in range(phi.numel()):
        s = l[i].item() * max(0.0, 1.0 - gamma * phi[i].item())
        u = s - l1
        if not math.isfinite(u):
            u = 0.0
        if positivity == "softplus":
            r = rho[i].item() + beta * u * (1 / (1 + math.exp(-rho[i].item())))
            new_rho[i] = r
            value = math.log1p(math.exp(r)) if r < 30 else r
        elif ascent == "additive":
            value = phi[i].item() + beta * u
        else:
            value = phi[i].item() * math.exp(beta * u)
        new_phi[i] = min(max(value, phi_min), upper)
    if phi_norm == "mean":
        new_phi = new_phi * (new_phi.numel() / new_phi.sum())
    if rho is not None:
        new_rho = torch.log(torch.expm1(new_phi))
    return new_phi, new_rho


class ReferenceSculptor:
    """The Sculptor step of §2.3 for a list of param groups (dicts of plain floats/strings).

    Each group: params (list of float64 leaf tensors with .grad set by the caller) plus
    hyperparameters. State is kept here, per parameter index.
    """

    def __init__(self, groups):
        self.groups = groups
        self.state = {}

    def step(self):
        for group in self.groups:
            fractures, phis, rhos, keys = [], [], [], []
            for p in group["params"]:
                g = p.grad.double()
                if group.get("maximize", False):
                    g = -g
                st = self.state.setdefault(id(p), self._init_state(p, group))
                fractures.append(fracture(g, group["pathway"]))
                self._descend(p, g, st, group)
                phis.append(st["phi"])
                rhos.append(st.get("rho"))
                keys.append(id(p))
            self._gild_group(group, fractures, phis, rhos, keys)

    def phi(self, p):
        return self.state[id(p)]["phi"]

    def _init_state(self, p, group):
        pathway = group["pathway"]
        shape = p.shape if pathway == "element" else (
            p.shape[:1] if pathway == "row" and p.dim() > 0 else ())
        phi = torch.full(shape, float(group.get("phi_init", 1.0)), dtype=torch.float64)
        st = {"phi": phi, "t": 0, "m": torch.zeros_like(p, dtype=torch.float64),
              "v": torch.zeros_like(p, dtype=torch.float64), "buf": None}
        if group["positivity"] == "softplus":
            st["rho"] = torch.log(torch.expm1(phi))
        return st

    def _descend(self, p, g, st, group):
        base, lr, wd = group["base"], group["lr"], group.get("weight_decay", 0.0)
        phi = st["phi"]
        phi_b = phi.reshape(phi.shape + (1,) * (p.dim() - phi.dim())) if phi.dim() else phi
        theta = p.detach().double()
        if base == "sgd":
            if wd:
                g = g + wd * theta
            mom = group.get("momentum", 0.0)
            if mom:
                damp = group.get("dampening", 0.0)
                st["buf"] = g.clone() if st["buf"] is None else mom * st["buf"] + (1 - damp) * g
                d = g + mom * st["buf"] if group.get("nesterov", False) else st["buf"]
            else:
                d = g
        else:
            b1, b2 = group.get("betas", (0.9, 0.999))
            eps = group.get("eps", 1e-8)
            if wd and base == "adamw":
                theta = theta * (1 - lr * wd)  # decoupled decay is not scaled by ϕ
            elif wd:
                g = g + wd * theta
            st["t"] += 1
            t = st["t"]
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            m_hat = st["m"] / (1 - b1**t)
            v_hat = st["v"] / (1 - b2**t)
            d = m_hat / (v_hat.sqrt() + eps)
        with torch.no_grad():
            p.copy_(theta - lr * phi_b * d)

    def _gild_group(self, group, fractures, phis, rhos, keys):
        options = {k: group[k] for k in ("beta", "gamma", "l1", "phi_min", "phi_max",
                                         "phi_norm", "ascent", "positivity")}
        if group["pathway"] == "tensor":  # one scope: the whole group
            l = torch.stack(fractures)
            if group["fracture"] == "relative":
                l = relative(l)
            rho = torch.stack(rhos) if rhos[0] is not None else None
            new_phi, new_rho = gild(torch.stack(phis), l, rho, **options)
            for j, key in enumerate(keys):
                self.state[key]["phi"] = new_phi[j].reshape(())
                if new_rho is not None:
                    self.state[key]["rho"] = new_rho[j].reshape(())
            return
        for l, phi, rho, key in zip(fractures, phis, rhos, keys):
            if group["fracture"] == "relative":
                l = relative(l)
            new_phi, new_rho = gild(phi, l, rho, **options)
            self.state[key]["phi"] = new_phi.reshape(phi.shape)
            if new_rho is not None:
                self.state[key]["rho"] = new_rho.reshape(phi.shape)
