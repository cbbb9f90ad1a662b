"""``qinject finetune``: quantization-aware fine-tuning of a plan from the command line (the
``finetune`` command ``qinject.app.cli`` adds to its group)."""

from __future__ import annotations

from pathlib import Path

import click

from qinject.app.api import finetune, load_onnx
from qinject.core.errors import QinjectError
from qinject.core.plan import NodeQuant, Plan
from qinject.core.rules import Rules
from qinject.core.stats import METHODS


@click.command("finetune")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Fine-tuned QDQ model path.")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Training inputs: .npz keyed by input name (optional 'labels'; the default loss needs none).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="Per-node plan (JSON), e.g. a search's.")
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), help="Per-node rules (JSON) giving the plan.")
@click.option("--weights", type=click.Choice(["4", "8", "16"]), default="8", show_default=True,
              help="Weight bits for every node (without --plan/--rules).")
@click.option("--activations", type=click.Choice(["4", "8", "16"]), default="8", show_default=True,
              help="Activation bits for every node (without --plan/--rules).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration data (default: --data).")
@click.option("--calib-method", type=click.Choice(METHODS), default="minmax", show_default=True,
              help="How the activation ranges training starts from are chosen.")
@click.option("--act-init", type=click.Choice(["calib", "mse"]), default="calib", show_default=True,
              help="Activation scales start from the calibrated ranges, or from LSQ+'s MSE on training batches.")
@click.option("--steps", type=int, default=500, show_default=True, help="Optimisation steps.")
@click.option("--batch", type=int, default=32, show_default=True, help="Samples per step.")
@click.option("--lr", type=float, default=1e-2, show_default=True,
              help="Scale/offset step, as a fraction of the initial scale.")
@click.option("--weight-lr", type=float, default=1e-2, show_default=True,
              help="Weight step, as a fraction of the channel's quantization step.")
@click.option("--scales-only", is_flag=True, help="Train scales and offsets only, not the weights.")
@click.option("--oscillation", type=click.Choice(["auto", "freeze", "dampen", "both", "off"]), default="auto", show_default=True,
              help="Oscillation control: auto freezes oscillating weights at <= 4 bits.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Save the training state here (.npz) every --checkpoint-every steps; resume from it if present.")
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-plan", type=click.Path(path_type=Path), help="Also write the plan trained, as JSON.")
def finetune_command(model: Path, output: Path, data_path: Path, plan_path: Path | None, rules_path: Path | None,
                     weights: str, activations: str, calib: Path | None, calib_method: str, act_init: str,
                     steps: int, batch: int,
                     lr: float, weight_lr: float, scales_only: bool, oscillation: str, checkpoint: Path | None,
                     checkpoint_every: int, seed: int, save_plan: Path | None) -> None:
    """Fine-tune MODEL (ONNX) quantized by a plan on --data and write the QDQ model to OUTPUT.

    Scales (LSQ+), offsets and weights are trained through the JAX backend by distillation from the
    float model, then written in the same QDQ form as `qinject quantize`.
    """
    if plan_path is not None and rules_path is not None:
        raise QinjectError("--plan and --rules exclude each other")
    if not data_path.exists():
        raise QinjectError(f"training data {str(data_path)!r} does not exist")
    plan = Plan.load(plan_path) if plan_path is not None else None
    if rules_path is not None:
        plan, _ = Rules.load(rules_path).plan(load_onnx(model))
    if plan is None:
        plan = Plan(NodeQuant(weights=int(weights), activations=int(activations)))
    result = finetune(model, str(data_path), steps, output=output, plan=plan,
                      calib=str(calib) if calib is not None else None, method=calib_method, batch=batch, lr=lr,
                      weight_lr=weight_lr, train_weights=not scales_only, act_init=act_init, oscillation=oscillation,
                      checkpoint=str(checkpoint) if checkpoint is not None else None,
                      checkpoint_every=checkpoint_every, seed=seed)
    report = result.finetune
    if save_plan is not None:
        result.plan.save(save_plan)
    resumed = f", resumed at step {report.resumed_from}" if report.resumed_from else ""
    click.echo(f"fine-tuned {report.quantizers} quantizer(s) of {len(result.quantized)} node(s) for "
               f"{report.steps} step(s) in {report.seconds:.1f} s{resumed}: loss {report.loss_start:.4g} -> "
               f"{report.loss_end:.4g}, {report.metric} {report.metric_end:.4g} on the last batches")
    if report.weights:
        click.echo(f"oscillation control froze {report.frozen} of {report.weights} low-bit weights")
    click.echo(f"wrote {output}")
