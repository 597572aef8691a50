"""Per-layer input subspaces: InfLoRA's memory of what earlier tasks fed each layer.

For an adapted linear layer ``y = W0 h + s B A h`` a block's update ``dW = s B A`` changes
the output only along its rows' span; InfLoRA (Liang & Li, CVPR 2024; the T5 code of
liangyanshuo/gainlora) keeps that span out of the earlier tasks' inputs:

- :class:`InputStatistic`: while enabled, forward pre-hooks add ``X^T X`` of every token
  row ``X`` a layer sees into a (d_in, d_in) fp32 sum on the device, with the row count
  (no host read per batch). ``covariance = sum / rows``, the released code's running
  mean of ``x x^T`` over tokens (padding positions included, as there).
- :func:`design_down`: the new block's A (r, d_in) = the top-r left singular vectors of
  ``(I - M M^T) C_new`` (``M``: the memory's orthonormal basis, ``C_new``: the new task's
  covariance), divided by sqrt(3), then projected off ``M`` once more (a rank-deficient
  ``(I - M M^T) C_new`` would otherwise hand out singular vectors of zero singular value,
  which SVD may put anywhere). The block then trains B only: ``dW M = 0``.
- :func:`gpm_update`: after task t the memory takes in the task's directions holding
  ``threshold_t`` of its energy, measured as the released code does (the squares of the
  covariance's singular values), keeping what is already there (DualGPM's ``remove``
  branch, the one the language-model code uses); at most d_in columns.

Which module collects and reduces over ranks is the run's business
(``sapt_dist.train.subspace``); this module is the math and the hooks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "InputStatistic",
    "SubspaceMemory",
    "design_down",
    "gpm_update",
    "task_threshold",
    "top_directions",
]


def task_threshold(base: float, task: int, total: int) -> float:
    """The energy threshold after task ``task`` (from 0) of ``total``: ``base`` rising
    linearly to 1 (``(1 - base) * task / total + base``, the released schedule)."""
    return (1.0 - base) * task / total + base


def _energy(s: torch.Tensor) -> torch.Tensor:
    return s.double() ** 2


@torch.no_grad()
def gpm_update(basis: torch.Tensor | None, cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """The memory's new orthonormal basis (d, k') after a task whose inputs have the
    (d, d) covariance ``cov``; ``basis`` (d, k) is the memory before it (None: empty).

    First task: the leading left singular vectors of ``cov`` whose cumulative energy
    fraction stays below ``threshold`` (at least one). Later: the fraction of the task's
    energy the basis already holds counts first; leading directions of
    ``(I - M M^T) cov`` are added while the total stays below ``threshold``."""
    cov = cov.float()
    d = cov.shape[0]
    if basis is None or basis.shape[1] == 0:
        u, s, _ = torch.linalg.svd(cov, full_matrices=False)
        ratio = _energy(s) / _energy(s).sum().clamp_min(1e-300)
        r = int((torch.cumsum(ratio, 0) < threshold).sum())
        return u[:, : max(r, 1)].contiguous()
    basis = basis.to(cov)
    total = _energy(torch.linalg.svdvals(cov)).sum().clamp_min(1e-300)
    hat = cov - basis @ (basis.t() @ cov)
    u, s, _ = torch.linalg.svd(hat, full_matrices=False)
    ratio = _energy(s) / total
    held = (total - _energy(s).sum()) / total
    # r = how many steps of ``while held < threshold: held += ratio[r]; r += 1`` run
    before = held + torch.cumsum(ratio, 0) - ratio
    r = int((before < threshold).sum())
    if r == 0:
        return basis.contiguous()
    return torch.cat([basis, u[:, :r]], dim=1)[:, :d].contiguous()


@torch.no_grad()
def top_directions(cov: torch.Tensor, basis: torch.Tensor | None, k: int) -> torch.Tensor:
    """(d, k) the leading left singular vectors of ``(I - M M^T) cov`` (``M`` = ``basis``,
    None: ``cov`` itself), each with its largest component positive.

    The sign is the one thing an SVD leaves open, and it depends on rounding: a 2-rank run,
    whose covariance is summed in another order, flipped one of InfLoRA's eight designed
    rows against the one-process run. A block is even in it (B learns the column's sign
    back, from zero), so fixing it changes no method and makes every rank count and BLAS
    build design the same directions."""
    cov = cov.float()
    if basis is not None and basis.shape[1] > 0:
        basis = basis.to(cov)
        cov = cov - basis @ (basis.t() @ cov)
    u = torch.linalg.svd(cov, full_matrices=False)[0][:, :k]
    peak = u.abs().argmax(dim=0, keepdim=True)  # (1, k): each column's largest component
    return u * torch.sign(u.gather(0, peak))


@torch.no_grad()
def design_down(cov: torch.Tensor, basis: torch.Tensor | None, rank: int) -> torch.Tensor:
    """(rank, d) the new block's frozen A from the new task's covariance ``cov`` (d, d),
    orthogonal to ``basis`` (d, k), the earlier tasks' subspace (None: no earlier task):
    :func:`top_directions` / sqrt(3), projected off ``basis`` once more (a rank-deficient
    projected covariance cannot hand out directions inside it)."""
    a = top_directions(cov, basis, rank).t() / math.sqrt(3.0)
    if basis is not None and basis.shape[1] > 0:
        basis = basis.to(a)
        a = a - (a @ basis) @ basis.t()
    return a.contiguous()


class InputStatistic:
    """``sum X^T X`` and the row count of every token row each of ``layers`` sees, while
    ``counting`` (a context: hooks on enter, removed on exit). The sums stay on the
    layers' device in fp32; the counts are host ints (a shape, no device read)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = dict(layers)
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {name: 0 for name in self.layers}
        self.counting = True
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.counting:
                return
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).float()
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = rows.new_zeros(rows.shape[1], rows.shape[1])
            acc.addmm_(rows.t(), rows)
            self.rows[name] += rows.shape[0]

        return hook

    def __enter__(self) -> InputStatistic:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def covariance(self, name: str) -> torch.Tensor:
        """(d_in, d_in) the mean of ``x x^T`` over the rows seen."""
        return self.sums[name] / max(self.rows[name], 1)


class SubspaceMemory:
    """The orthonormal input basis (d_in, k) of every adapted layer (fp32, on the CPU
    between tasks), filed with the run's blocks as ``<layer>.basis`` tensors."""

    FILE = "subspace.safetensors"

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.bases: dict[str, torch.Tensor] = {}

    def basis(self, name: str, device: torch.device | None = None) -> torch.Tensor | None:
        b = self.bases.get(name)
        return None if b is None else b.to(device or b.device)

    def update(self, name: str, cov: torch.Tensor, threshold: float) -> None:
        new = gpm_update(self.basis(name, cov.device), cov, threshold)
        self.bases[name] = new.detach().to("cpu", torch.float32).contiguous()

    def dims(self) -> dict[str, int]:
        """Columns of each layer's basis (the log's summary)."""
        return {n: int(b.shape[1]) for n, b in self.bases.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{n}.basis": b.contiguous() for n, b in self.bases.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        unknown = sorted(k for k in tensors if k.removesuffix(".basis") not in self.names)
        if unknown:
            raise ValueError(f"{where}: bases of layers this model does not adapt: {unknown[:4]}")
        self.bases = {k.removesuffix(".basis"): v.float().contiguous() for k, v in tensors.items()}
