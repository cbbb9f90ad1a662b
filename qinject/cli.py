"""The ``qinject`` command line: quantize, inspect, demo.

Every error a user can cause prints one line (``error: ...``) and exits 1; no traceback, no output
file. Set QINJECT_DEBUG=1 to see tracebacks of internal errors.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from qinject.errors import QinjectError
from qinject.stats import METHODS


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except QinjectError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug: still one line, unless asked for the traceback
            if os.environ.get("QINJECT_DEBUG") == "1":
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc} (set QINJECT_DEBUG=1 for the traceback)",
                       err=True)
            sys.exit(3)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


@click.group(cls=_Group)
@click.version_option(package_name="qinject")
def cli() -> None:
    """qinject: quantize models by compiler passes (ONNX in, quantized ONNX out)."""
    warnings.showwarning = _one_line_warnings
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Quantized model path.")
@click.option("--weights", type=click.Choice(["4", "8", "16"]), default="8", show_default=True,
              help="Weight bits for every node (ignored with --plan).")
@click.option("--activations", type=click.Choice(["4", "8", "16"]), default="8", show_default=True,
              help="Activation bits for every node (ignored with --plan).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="Per-node plan (JSON).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data: .npz keyed by input name, or a folder of .npy/.npz. Random if absent.")
@click.option("--calib-method", type=click.Choice(METHODS), default="minmax", show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For --calib-method percentile.")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per channel.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Calibration batch size.")
@click.option("--save-plan", type=click.Path(path_type=Path), help="Also write the plan applied, as JSON.")
def quantize(model: Path, output: Path, weights: str, activations: str, plan_path: Path | None,
             calib: Path | None, calib_method: str, percentile: float, per_tensor: bool, batch_size: int,
             save_plan: Path | None) -> None:
    """Quantize MODEL (ONNX) and write the Q/DQ model to OUTPUT."""
    from qinject.api import quantize_onnx
    from qinject.plan import Plan

    if plan_path is not None:
        plan = Plan.load(plan_path)
    else:
        plan = Plan.uniform(int(weights), int(activations), per_channel=not per_tensor)
    result = quantize_onnx(model, output, plan=plan, calib=calib, method=calib_method, batch_size=batch_size,
                           percentile=percentile)
    if save_plan is not None:
        plan.save(save_plan)
    before, after = _size(model), _size(output)
    click.echo(f"quantized {len(result.quantized)} node(s) of {model.name} -> {output}")
    click.echo(f"file size: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({before / max(after, 1):.1f}x smaller)")
    for node, notes in result.notes.items():
        for note in notes:
            click.echo(f"note: {node}: {note}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
def inspect(model: Path) -> None:
    """List MODEL's quantizable nodes: name, op, weight shape, MACs, parameters."""
    from qinject.inspect import quantizable_table

    rows = quantizable_table(model)
    click.echo(_format_table(["node", "op", "weight shape", "MACs", "params"], rows))
    click.echo(f"{len(rows)} quantizable node(s)")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True,
              help="Folder for the quantized model and plan.")
def demo(out: Path) -> None:
    """Quantize the bundled digits CNN and compare it with the float model."""
    from qinject.demo import run_demo

    run_demo(out, echo=click.echo)


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _format_table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    cli(prog_name="qinject")


if __name__ == "__main__":
    main()
