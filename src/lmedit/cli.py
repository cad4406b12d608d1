"""The ``lmedit`` command line: a thin layer over the Python API.

    lmedit models                      bundled and cached models
    lmedit methods                     editing methods and their hyper-parameters
    lmedit generate --prompt ...       greedy continuation
    lmedit edit --prompt "The capital of {} is" --subject France --target " Rome" [--save DIR]
    lmedit apply DIR --prompt ...      load a saved patch, apply it, generate
    lmedit eval --data counterfact --method ft-m --n 100 --protocol single
    lmedit report runs/*/              several runs as one table
    lmedit trace -p ... -s SUBJECT     causal trace (which states carry the fact), optional heatmap
    lmedit locate -p ... -s SUBJECT    edit layers suggested by an MLP causal trace
    lmedit lens -p ...                 logit lens (top tokens per layer), optional heatmap

Every command takes ``--json`` for machine-readable output. Errors are one line on stderr, exit 1.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Edit, steer and inspect the knowledge inside language models.")

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="bundled name, .gguf file, model directory or hub id")
DeviceOpt = typer.Option(None, help="cpu, cuda, mps or auto (default: best available)")
DtypeOpt = typer.Option(None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object instead of text")
TokensOpt = typer.Option(20, "--max-new-tokens", "-n", help="tokens to generate")
ChatOpt = typer.Option(False, "--chat", help="wrap prompts in the tokenizer's chat template")


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def _load(model: str, device: Optional[str], dtype: Optional[str], chat: bool = False) -> Any:
    from lmedit.models import load_model

    return load_model(model, device=device, dtype=dtype, chat=chat)


def _parse_hparams(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--hparam takes key=value, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


@app.command()
def models(as_json: bool = JsonOpt) -> None:
    """List the bundled models: whether their weights package is installed and whether they are cached."""
    from lmedit.models import bundled_models, cache_dir

    rows = bundled_models()
    lines = [f"{'name':<14} {'installed':<9} {'cached':<6} description"]
    for r in rows:
        lines.append(f"{r['name']:<14} {'yes' if r['installed'] else 'no':<9} {'yes' if r['cached'] else 'no':<6} "
                     f"{r['description']}" + ("" if r["installed"] else f"  (install: {r['install']})"))
    lines.append(f"cache: {cache_dir()}")
    _emit(as_json, {"models": rows, "cache": str(cache_dir())}, "\n".join(lines))


@app.command()
def methods(as_json: bool = JsonOpt) -> None:
    """List the editing methods and their default hyper-parameters."""
    from lmedit.methods import METHODS

    data = {name: {f.name: f.default for f in dataclasses.fields(cls.HParams)} for name, cls in sorted(METHODS.items())}
    text = "\n".join(f"{name:<8} " + ", ".join(f"{k}={v}" for k, v in hp.items()) for name, hp in data.items())
    _emit(as_json, {"methods": data}, text + "\n(None: derived from the model, e.g. the layer from a depth fraction)")


@app.command()
def generate(prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt (repeatable)"),
             model: str = ModelOpt, max_new_tokens: int = TokensOpt, device: Optional[str] = DeviceOpt,
             dtype: Optional[str] = DtypeOpt, chat: bool = ChatOpt, as_json: bool = JsonOpt) -> None:
    """Greedy continuation of one or more prompts."""
    from lmedit.continuations import generate as gen

    m = _load(model, device, dtype, chat)
    outs = gen(m, prompt, max_new_tokens=max_new_tokens)
    _emit(as_json, {"model": m.name, "generations": [{"prompt": p, "output": o} for p, o in zip(prompt, outs)]},
          "\n".join(f"{p}\u2192{o}" for p, o in zip(prompt, outs)))


@app.command()
def edit(prompt: str = typer.Option(..., "--prompt", "-p", help="prompt template with {} for the subject, or a "
                                    "prompt containing the subject"),
         subject: str = typer.Option(..., "--subject", "-s"),
         target: str = typer.Option(..., "--target", "-t", help="the new continuation, e.g. ' Rome'"),
         method: str = typer.Option("ft-m", "--method", help="editing method (see `lmedit methods`)"),
         hparam: list[str] = typer.Option([], "--hparam", help="hyper-parameter override key=value (repeatable)"),
         probe: list[str] = typer.Option([], "--probe", help="extra prompt to compare before/after (repeatable)"),
         save: Optional[str] = typer.Option(None, "--save", help="directory to save the patch to"),
         model: str = ModelOpt, max_new_tokens: int = TokensOpt, device: Optional[str] = DeviceOpt,
         dtype: Optional[str] = DtypeOpt, chat: bool = ChatOpt, as_json: bool = JsonOpt) -> None:
    """Edit one fact and show generations before and after the edit."""
    from lmedit.methods import get_method
    from lmedit.requests import EditRequest
    from lmedit.continuations import generate as gen

    request = EditRequest(prompt, subject, target)
    editor = get_method(method, **_parse_hparams(hparam))
    m = _load(model, device, dtype, chat)
    prompts = [request.prompt, *probe]
    before = gen(m, prompts, max_new_tokens=max_new_tokens)
    patch = editor.edit(m, request)
    with patch.applied(m):
        after = gen(m, prompts, max_new_tokens=max_new_tokens)
    if save:
        patch.save(save)
    rows = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
    lines = [f"{method} edit of {m.name}: {request.prompt!r} \u2192 {target!r} in {patch.info['seconds']:.2f} s"]
    for r in rows:
        lines += [f"  prompt: {r['prompt']}", f"    before: {r['before']!r}", f"    after:  {r['after']!r}"]
    if save:
        lines.append(f"patch saved to {save} (apply it with: lmedit apply {save} --prompt ...)")
    _emit(as_json, {"model": m.name, "method": method, "hparams": patch.hparams, "info": patch.info,
                    "generations": rows, "saved": save}, "\n".join(lines))


@app.command()
def apply(directory: str = typer.Argument(..., help="a directory written by `lmedit edit --save`"),
          prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt (repeatable)"),
          model: Optional[str] = typer.Option(None, "--model", "-m", help="default: the model the patch was made on"),
          max_new_tokens: int = TokensOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
          chat: bool = ChatOpt, as_json: bool = JsonOpt) -> None:
    """Load a saved patch, apply it and generate."""
    from lmedit.patch import Patch
    from lmedit.continuations import generate as gen

    patch = Patch.load(directory)
    m = _load(model or patch.info.get("model", "smollm2-135m"), device, dtype, chat)
    with patch.applied(m):
        outs = gen(m, prompt, max_new_tokens=max_new_tokens)
    _emit(as_json, {"model": m.name, "patch": directory, "method": patch.method,
                    "generations": [{"prompt": p, "output": o} for p, o in zip(prompt, outs)]},
          "\n".join(f"{p}\u2192{o}" for p, o in zip(prompt, outs)))


@app.command("eval")
def eval_(data: str = typer.Option(..., "--data", "-d", help="dataset name (counterfact, zsre, …) or file path"),
          method: str = typer.Option("ft-m", "--method", help="editing method, or 'none' for the unedited model"),
          protocol: str = typer.Option("single", "--protocol", help="single, batch or sequential"),
          n: Optional[int] = typer.Option(None, "--n", help="first N cases"),
          batch_size: int = typer.Option(1, "--batch-size", help="cases per edit call (batch, sequential)"),
          scoring: str = typer.Option("after_all", "--scoring", help="sequential: after_each or after_all"),
          checkpoints: str = typer.Option("1,10,100,1000", "--checkpoints", help="sequential after_all: T values"),
          hparam: list[str] = typer.Option([], "--hparam", help="hyper-parameter override key=value (repeatable)"),
          out: Optional[str] = typer.Option(None, "--out", help="run directory (default: runs/<model>-<method>-…)"),
          resume: bool = typer.Option(False, "--resume", help="continue a killed run in --out"),
          no_generation: bool = typer.Option(False, "--no-generation", help="skip the generation metrics"),
          fluency: bool = typer.Option(False, "--fluency", help="also fluency/consistency (100-token generations)"),
          seed: int = typer.Option(0, "--seed"),
          shuffle: bool = typer.Option(False, "--shuffle", help="edit the first N cases in an order drawn from --seed"),
          model: str = ModelOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
          chat: bool = ChatOpt, as_json: bool = JsonOpt) -> None:
    """Edit and score a benchmark; writes cases.jsonl, summary.json, summary.md (and curves.png)."""
    from pathlib import Path

    from lmedit.evaluate import evaluate

    try:
        marks = [int(t) for t in checkpoints.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"--checkpoints takes comma-separated integers, got {checkpoints!r}") from None
    run_dir = out or str(Path("runs") / "-".join([Path(model).name, method, Path(data).stem, protocol]))
    m = _load(model, device, dtype, chat)
    report = evaluate(m, None if method in ("none", "unedited") else method, data, protocol=protocol, n=n, batch_size=batch_size,
                      scoring=scoring, checkpoints=marks, hparams=_parse_hparams(hparam), out_dir=run_dir,
                      resume=resume, generation=not no_generation, fluency=fluency, seed=seed, shuffle=shuffle,
                      progress=not as_json)
    _emit(as_json, {"out": run_dir, "config": report.config, "summary": report.summary},
          report.table() + f"\n\nwritten to {run_dir} ({report.config['wall_seconds']:.1f} s)")


@app.command()
def report(directories: list[str] = typer.Argument(..., help="run directories written by `lmedit eval`"),
           resummarize: bool = typer.Option(False, "--resummarize",
                                             help="first recompute each run's summary from its cases.jsonl"),
           plot: Optional[str] = typer.Option(None, "--plot", help="write the lifelong runs' curves (Rel., Gen., Loc. "
                                              "against T, a line per run) to this .png"),
           edits: int = typer.Option(0, "--edits", help="also print each sequential run's edit log (seconds and "
                                     "training report per edit call, edits.jsonl) in blocks of this many calls"),
           retention: int = typer.Option(0, "--retention", help="also print each lifelong run's forgetting: --metric "
                                         "of each block of this many edits (in edit order) at each mark T"),
           metric: str = typer.Option("rewrite_tf", "--metric", help="the per-case metric of --retention"),
           as_json: bool = JsonOpt) -> None:
    """Print several evaluation runs side by side as one table (method rows, metric columns).

    Of several paths (a shell glob such as ``runs/*``), those that are not runs are skipped with a
    line on stderr; a single path that is not a run, or none that is, is an error."""
    from lmedit.errors import EvalError
    from lmedit.evaluate import load_report, markdown_table, plot_comparison
    from lmedit.evaluate import resummarize as recompute
    from lmedit.evaluate.report import edit_log_table, retention_table

    found: list[tuple[str, Any]] = []
    for d in directories:
        try:
            found.append((d, recompute(d) if resummarize else load_report(d)))
        except EvalError as e:
            if len(directories) == 1:
                raise
            typer.echo(f"skipped: {e}", err=True)
    if not found:
        raise EvalError(f"none of the {len(directories)} paths is an evaluation run")
    reports = [r for _, r in found]
    text = markdown_table(reports)
    if plot:
        plot_comparison(reports, plot)
        text += f"\ncurves written to {plot}"
    if edits:
        for d, _ in found:
            table = edit_log_table(d, edits)
            text += f"\n\n{d}: " + (f"edit calls in blocks of {edits}\n{table}" if table else "no edit log (edits.jsonl)")
    if retention:
        for d, _ in found:
            table = retention_table(d, retention, metric)
            text += f"\n\n{d}: " + (f"{metric} by blocks of {retention} edits (rows) after T edits (columns)\n{table}"
                                    if table else "no lifelong marks (not a sequential after_all run)")
    _emit(as_json, {"runs": [{"dir": d, "config": r.config, "summary": r.summary} for d, r in found]},
          text)


def _emit_result(result: Any, lines: list[str], plot: Optional[str], picture: str, as_json: bool) -> None:
    """Print an inspection result (its ``to_dict()`` with ``--json``), after writing its ``picture`` to ``plot``."""
    if plot:
        result.plot(plot)
        lines.append(f"{picture} written to {plot}")
    _emit(as_json, result.to_dict(), "\n".join(lines))


@app.command()
def trace(prompt: str = typer.Option(..., "--prompt", "-p", help="a prompt containing the subject"),
          subject: str = typer.Option(..., "--subject", "-s"),
          answer: Optional[str] = typer.Option(None, "--answer", "-a", help="default: the model's own next token"),
          kind: str = typer.Option("hidden", "--kind", help="hidden, mlp or attn"),
          samples: int = typer.Option(10, "--samples", help="noise samples"),
          plot: Optional[str] = typer.Option(None, "--plot", help="write the heatmap to this .png"),
          model: str = ModelOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
          chat: bool = ChatOpt, as_json: bool = JsonOpt) -> None:
    """Causal trace: P(answer) when one state is restored in a run with the subject corrupted."""
    from lmedit.inspect import causal_trace

    m = _load(model, device, dtype, chat)
    result = causal_trace(m, prompt, subject, answer, kind=kind, samples=samples)  # type: ignore[arg-type]
    effect = result.effect
    lines = [f"causal trace ({kind}) of {m.name}: {prompt!r} \u2192 {result.answer!r}; "
             f"clean {result.clean:.3f}, corrupted {result.corrupted:.3f}", "token: best layer (indirect effect)"]
    for i, token in enumerate(result.tokens):
        mark = "*" if result.subject[0] <= i < result.subject[1] else " "
        lines.append(f"  {mark}{token!r:>16}: layer {int(effect[i].argmax()):>2} ({float(effect[i].max()):+.3f})")
    _emit_result(result, lines, plot, "heatmap", as_json)


@app.command()
def lens(prompt: str = typer.Option(..., "--prompt", "-p"),
         k: int = typer.Option(3, "--top", help="tokens per layer"),
         plot: Optional[str] = typer.Option(None, "--plot", help="write the heatmap to this .png"),
         model: str = ModelOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
         chat: bool = ChatOpt, as_json: bool = JsonOpt) -> None:
    """Logit lens: the top tokens each layer's residual stream predicts at the last position."""
    from lmedit.inspect import logit_lens

    m = _load(model, device, dtype, chat)
    result = logit_lens(m, prompt, k)
    lines = [f"logit lens of {m.name} at the last token of {prompt!r}:"]
    for layer in range(result.top_ids.shape[0]):
        tops = ", ".join(f"{t!r} {p:.2f}" for t, p in result.top_tokens(layer))
        lines.append(f"  layer {layer:>2}: {tops}")
    _emit_result(result, lines, plot, "heatmap", as_json)


@app.command()
def attribute(prompt: str = typer.Option(..., "--prompt", "-p"),
              answer: Optional[str] = typer.Option(None, "--answer", "-a", help="default: the model's own next token"),
              steps: int = typer.Option(20, "--steps", help="Riemann-sum points"),
              plot: Optional[str] = typer.Option(None, "--plot", help="write the per-layer bar chart to this .png"),
              model: str = ModelOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
              chat: bool = ChatOpt, as_json: bool = JsonOpt) -> None:
    """Integrated-gradients attribution of every MLP neuron for the answer to a prompt."""
    from lmedit.inspect import neuron_attribution

    m = _load(model, device, dtype, chat)
    result = neuron_attribution(m, prompt, answer, steps)
    lines = [f"neuron attribution of {m.name} for {result.answer!r} after {prompt!r}:", "  top neurons (layer.neuron: IG):"]
    lines += [f"    L{layer}.{n}: {v:+.4f}" for layer, n, v in result.top(10)]
    _emit_result(result, lines, plot, "chart", as_json)


@app.command()
def circuit(prompt: str = typer.Option(..., "--prompt", "-p"),
            answer: Optional[str] = typer.Option(None, "--answer", "-a", help="default: the model's own next token"),
            plot: Optional[str] = typer.Option(None, "--plot", help="write the graph to this .png"),
            model: str = ModelOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
            chat: bool = ChatOpt, as_json: bool = JsonOpt) -> None:
    """Circuit sketch: the attention heads that matter most for the answer, and where they read from."""
    from lmedit.inspect import head_attribution

    m = _load(model, device, dtype, chat)
    result = head_attribution(m, prompt, answer)
    lines = [f"head attribution of {m.name} for {result.answer!r} after {prompt!r}:"]
    for layer, head, a in result.top_heads(8):
        weights = result.attention[layer, head]
        reads = ", ".join(f"{result.tokens[int(t)]!r} {float(weights[t]):.2f}" for t in weights.argsort(descending=True)[:3])
        lines.append(f"  L{layer}H{head}: {a:+.4f}   reads {reads}")
    _emit_result(result, lines, plot, "graph", as_json)


@app.command()
def locate(prompt: str = typer.Option(..., "--prompt", "-p", help="a prompt containing the subject"),
           subject: str = typer.Option(..., "--subject", "-s"),
           answer: Optional[str] = typer.Option(None, "--answer", "-a", help="default: the model's own next token"),
           samples: int = typer.Option(10, "--samples", help="noise samples"),
           model: str = ModelOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
           chat: bool = ChatOpt, as_json: bool = JsonOpt) -> None:
    """Suggest edit layers for a model from an MLP causal trace at the subject's last token."""
    from lmedit.inspect import suggest_layers

    m = _load(model, device, dtype, chat)
    found = suggest_layers(m, prompt, subject, answer, samples=samples)
    trace_ = found.pop("trace")
    effects = found["effect_by_layer"]
    top = sorted(range(len(effects)), key=lambda i: -effects[i])[:5]
    text = (f"MLP causal trace of {m.name} at the last token of {subject!r} (answer {trace_.answer!r}): "
            f"strongest layers {top}\n"
            f"suggested: rome --hparam layer={found['rome_layer']}   memit --hparam layers={found['memit_layers']}")
    _emit(as_json, found, text)


def main() -> None:
    """Console entry point: lmedit errors become one line on stderr and exit status 1."""
    from lmedit.errors import LmeditError

    logging.basicConfig(level=logging.WARNING, format="lmedit: %(message)s")
    try:
        app()
    except LmeditError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
