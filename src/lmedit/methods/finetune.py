"""Fine-tuning editors: FT-L, FT-M, LoRA (through ``peft``) and FT-EWC.

All fine-tune the MLP output projection ``W_out`` of chosen layers with Adam, all other weights
frozen, in one training loop (``FineTune``); they differ in what is trained (``FineTune.trainable``) and
in the loss. FT-L, FT-M and FT-EWC train a float32 delta ``ΔW`` (the layer computes ``(W + ΔW) x``
through a hook), so the same code serves bf16 models on GPU and the patch is ``ΔW`` itself; LoRA trains
a ``peft`` adapter, ``ΔW = (α/r) B A``, and its patch holds the two factors.

* **FT-M** (masked fine-tuning; Gangadhar & Stratos 2024, EasyEdit's ``target_new`` objective):
  minimise the NLL of the target tokens under teacher forcing with the prompt masked out,
  ``L = −(1/|y|) Σ_t log P(y_t | x, y_<t)``, averaged over requests.
* **FT-L** (ROME's constrained fine-tuning baseline, EasyEdit's ``prompt_last`` objective):
  all target tokens are scored from the distribution at the prompt's last position,
  ``L = −(1/|y|) Σ_t log P(y_t | x)``, and after every step the change is clamped to an L∞ ball,
  ``‖ΔW‖_∞ ≤ ε`` (``norm_constraint``).

Defaults follow the published settings (EasyEdit's FT hyper-parameters for Llama: layer 21 of 32,
Adam, lr 5e-4, 25 steps; ROME's FT-L: ε = 5e-4) with the layer taken at the same depth fraction.
Training stops early once the loss falls below ``stop_loss``. The blocks below the lowest edited
layer run once and are replayed (they cannot change), which is most of a forward pass saved.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch

from lmedit.errors import EditError
from lmedit.hooks import Hooks, ReplayBelow
from lmedit.methods.base import HParams, Method
from lmedit.models.spec import get_module, is_conv1d
from lmedit.patch import Component, Patch, WeightDelta
from lmedit.requests import EditRequest
from lmedit.scoring import encode, forward_logits, target_logprobs


@dataclass
class FTHParams(HParams):
    """Hyper-parameters of FT-L / FT-M.

    Attributes:
        layers: layers whose ``W_out`` is fine-tuned (default: the one at 2/3 depth).
        objective: ``"target"`` (FT-M: every target token, prompt masked) or ``"last_token"``
            (FT-L: target tokens scored at the prompt's last position).
        lr: Adam learning rate.  steps: maximum optimisation steps.
        norm_constraint: L∞ bound on each entry of ``ΔW`` (``None``: unconstrained).
        weight_decay: L2 penalty on ``ΔW``.
        stop_loss: stop once the loss is below this (``0`` runs all steps).
    """

    layers: tuple[int, ...] | None = None
    objective: Literal["target", "last_token"] = "target"
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float | None = None
    weight_decay: float = 0.0
    stop_loss: float = 0.05

    def _defaults(self, model: Any) -> dict[str, Any]:
        return {"layers": (model.spec.layer_at(21 / 31),)}


ADAPTER = "lmedit"  # the name of the peft adapter LoRA trains


@dataclass
class Trainable:
    """What a fine-tuning editor trains: the optimiser's tensors, the ``ΔW`` functions to add to module
    weights through hooks (module path → current ``ΔW``), and how to turn the result into components."""

    params: list[torch.Tensor]
    hooked: dict[str, Callable[[], torch.Tensor]]
    components: Callable[[], list[Component]]


class FineTune(Method):
    """The fine-tuning editors' shared training loop (see the module docstring for the objectives)."""

    name = "ft"
    HParams = FTHParams

    def compute(self, model: Any, hp: FTHParams, requests: Sequence[EditRequest],
                originals: dict[str, torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        spec = model.spec
        layers = sorted({spec._layer(layer) for layer in hp.layers})
        names = [f"{spec.path(layer, 'mlp_out')}.weight" for layer in layers]
        prompts = [r.prompt for r in requests]
        batch = encode(model, prompts, [r.target_new for r in requests])
        loss_fn = self._target_loss if hp.objective == "target" else self._last_token_loss
        if hp.objective == "last_token":
            batch = (batch, encode(model, prompts))
        penalty = self.penalty(model, hp, names)
        losses: list[float] = []
        blocks = get_module(model.module, spec.blocks)
        with self.trainable(model, hp, names) as trained, Hooks(model.module) as hooks, \
                ReplayBelow(blocks, layers[0]), torch.enable_grad():
            for path, delta in trained.hooked.items():
                hooks.add_to_weight(path, delta)
            optimizer = torch.optim.Adam(trained.params, lr=hp.lr, weight_decay=hp.weight_decay)
            for _ in range(hp.steps):
                loss = loss_fn(model, batch)
                losses.append(loss.item())
                if losses[-1] < hp.stop_loss:
                    break
                if penalty is not None:
                    loss = loss + penalty([d() for d in trained.hooked.values()])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if hp.norm_constraint is not None:
                    with torch.no_grad():
                        for p in trained.params:
                            p.clamp_(-hp.norm_constraint, hp.norm_constraint)
            else:
                with torch.no_grad():
                    losses.append(float(loss_fn(model, batch)))
            components = trained.components()
        return components, {"steps": len(losses) - 1, "loss_start": losses[0], "loss_end": losses[-1]}

    # ---------------------------------------------------------------- what is trained (subclasses)
    @contextmanager
    def trainable(self, model: Any, hp: Any, names: list[str]) -> Iterator[Trainable]:
        """What the optimiser trains while the context is open: here a dense float32 ``ΔW`` per parameter,
        added to the weight through a hook (the weights themselves never change)."""
        params = [torch.zeros(model.parameter(n).shape, dtype=torch.float32, device=model.device, requires_grad=True)
                  for n in names]
        yield Trainable(params, {n.removesuffix(".weight"): (lambda p=p: p) for n, p in zip(names, params)},
                        lambda: [WeightDelta(n, p.detach().clone()) for n, p in zip(names, params)])

    def penalty(self, model: Any, hp: Any, names: list[str]) -> Any:
        """An extra loss on the current deltas (FT-EWC), or ``None``."""
        return None

    @staticmethod
    def _target_loss(model: Any, batch: Any) -> torch.Tensor:
        """FT-M: mean over requests of the mean target-token NLL (prompt masked)."""
        logp = target_logprobs(model, batch)
        lengths = batch.target_mask.sum(1).clamp(min=1)
        return -(logp.sum(1) / lengths).mean()

    @staticmethod
    def _last_token_loss(model: Any, batches: Any) -> torch.Tensor:
        """FT-L: target tokens scored from the distribution at the prompt's last position."""
        with_targets, prompts_only = batches
        logp = torch.log_softmax(forward_logits(model, prompts_only, last=1)[:, -1].float(), dim=-1)
        n = with_targets.n_target
        ids, mask = with_targets.input_ids[:, -n:], with_targets.target_mask[:, -n:]
        token_logp = logp.gather(1, ids) * mask
        return -(token_logp.sum(1) / mask.sum(1).clamp(min=1)).mean()


class FTM(FineTune):
    """FT-M: masked fine-tuning on the target tokens."""

    name = "ft-m"


@dataclass
class FTLHParams(FTHParams):
    objective: Literal["target", "last_token"] = "last_token"
    norm_constraint: float | None = 5e-4
    stop_loss: float = 0.0


class FTL(FineTune):
    """FT-L: last-token fine-tuning with an L∞ norm constraint."""

    name = "ft-l"
    HParams = FTLHParams


@dataclass
class LoRAHParams(FTHParams):
    """LoRA: ``ΔW = (α/r) B A`` (``A`` Kaiming-uniform, ``B`` zero at the start; ``peft``'s initialisation)
    on the MLP output projections of all layers, dropout on the adapter's input while training.
    EasyEdit's LoRA settings (rank 8, α 32, dropout 0.1, 70 steps) except the learning rate: 1e-3 instead
    of 5e-3, because these are the MLP outputs rather than the attention q/v projections (at 5e-3
    SmolLM2's "The capital of France is" → " Rome" after one Eiffel-Tower edit; at 1e-3 it stays " Paris").
    ``seed`` seeds ``A``'s initialisation and the dropout masks (the caller's random state is left alone)."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    lr: float = 1e-3
    steps: int = 70
    seed: int = 0

    def _defaults(self, model: Any) -> dict[str, Any]:
        return {"layers": tuple(range(model.spec.n_layers))}


class LoRA(FineTune):
    """LoRA fine-tuning on the target tokens (FT-M's objective), trained as a ``peft`` adapter.

    While the edit trains, ``peft`` wraps each target module in a LoRA layer (the base weights are left
    as they are and frozen); afterwards the wrappers are removed again. The patch holds the adapter as
    its two factors per module (``WeightDelta`` with ``left = (α/r) B``, ``right = A``, in the weight's
    own layout: transposed for GPT-2's ``Conv1D``): applied, ``ΔW`` is merged into the weight; reverted,
    the weight is restored bit for bit. ``save_peft_adapter`` writes it as a ``peft`` adapter directory.
    """

    name = "lora"
    HParams = LoRAHParams

    @contextmanager
    def trainable(self, model: Any, hp: LoRAHParams, names: list[str]) -> Iterator[Trainable]:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        if hp.rank < 1 or hp.alpha <= 0 or not 0 <= hp.dropout < 1:
            raise EditError(f"lora needs rank ≥ 1, alpha > 0 and 0 ≤ dropout < 1 (got {hp.rank}, {hp.alpha}, {hp.dropout})")
        paths = [n.removesuffix(".weight") for n in names]
        conv1d = [is_conv1d(get_module(model.module, p)) for p in paths]
        config = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=paths,
                            fan_in_fan_out=conv1d[0], bias="none")
        cuda = list(range(torch.cuda.device_count())) if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(hp.seed)
            tuner = LoraModel(model.module, config, ADAPTER)
            try:
                wrapped = [get_module(model.module, p) for p in paths]
                for layer in wrapped:  # the model stays in eval mode; only the adapter's dropout trains
                    layer.lora_dropout[ADAPTER].train()
                factors = [(layer.lora_B[ADAPTER].weight, layer.lora_A[ADAPTER].weight) for layer in wrapped]
                scale = hp.alpha / hp.rank

                def components() -> list[Component]:
                    out: list[Component] = []
                    for n, transposed, (b, a) in zip(names, conv1d, factors):
                        b, a = b.detach().float().clone(), a.detach().float().clone()
                        out.append(WeightDelta(n, left=scale * a.T, right=b.T) if transposed
                                   else WeightDelta(n, left=scale * b, right=a))
                    return out

                yield Trainable([t for pair in factors for t in pair], {}, components)
            finally:
                tuner.unload()  # the original modules back in place, unchanged


def save_peft_adapter(patch: Patch, model: Any, directory: str | Path) -> Path:
    """Write a LoRA patch as a ``peft`` adapter directory (``adapter_config.json``,
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base_model, directory)`` loads.

    A module's factors are stored with ``lora_alpha = r`` (scale 1) and ``B`` = the patch's ``left``, so
    ``B A`` is exactly the patch's ``ΔW``. A sequence of LoRA edits (``Patch.compose``) becomes one adapter:
    ``Σᵢ Bᵢ Aᵢ = [B₁ … B_k] [A₁; …; A_k]``, of rank ``k·r``.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if patch.method != "lora" or not all(isinstance(c, WeightDelta) and c.left is not None for c in patch.components):
        raise EditError(f"only a LoRA patch can be written as a peft adapter (this one is {patch.method!r})")
    if patch.base_fingerprint != model.fingerprint:
        raise EditError("the patch was computed for another model; load the model it was made for")
    by_module: dict[str, list[WeightDelta]] = {}
    for c in patch.components:
        by_module.setdefault(c.param.removesuffix(".weight"), []).append(c)  # type: ignore[arg-type]
    tensors, ranks, transposed = {}, {}, set()
    for path, deltas in by_module.items():
        flip = is_conv1d(get_module(model.module, path))
        transposed.add(flip)
        b = torch.cat([(d.right.T if flip else d.left) for d in deltas], dim=1)  # type: ignore[union-attr]
        a = torch.cat([(d.left.T if flip else d.right) for d in deltas], dim=0)  # type: ignore[union-attr]
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.float().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.float().contiguous()
        ranks[path] = a.shape[0]
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    other = {p: r for p, r in ranks.items() if r != rank}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(by_module), fan_in_fan_out=True in transposed,
                        bias="none", rank_pattern=other, alpha_pattern=dict(other), base_model_name_or_path=model.name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@dataclass
class EWCHParams(FTHParams):
    """FT-EWC: FT-M plus ``λ Σᵢ Fᵢ ΔWᵢ²`` with ``F`` the diagonal Fisher of ``W_out`` on corpus text."""

    ewc_lambda: float = 1e6
    fisher_tokens: int = 20_000
    corpus: str | None = None


class FTEWC(FineTune):
    """Elastic weight consolidation (Kirkpatrick et al. 2017) as an editing baseline.

    The diagonal Fisher ``Fᵢ = E[(∂ log p(x) / ∂Wᵢ)²]`` is estimated per token batch over corpus text
    (``lmedit.stats.fisher_diagonal``; cached on disk) and the change of each weight is penalised in
    proportion: weights the corpus relies on move least.
    """

    name = "ft-ewc"
    HParams = EWCHParams

    def penalty(self, model: Any, hp: EWCHParams, names: list[str]) -> Any:
        from lmedit.stats import fisher_diagonal

        fishers = [fisher_diagonal(model, n, hp.corpus, hp.fisher_tokens).to(model.device) for n in names]
        return lambda deltas: hp.ewc_lambda * sum((f * d.float() ** 2).sum() for f, d in zip(fishers, deltas))
