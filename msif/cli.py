"""The `msif` command: a small dispatcher over one Hydra app per stage.

`msif <stage> [overrides]` removes the stage word from argv and runs that stage's `@hydra.main` app with its own
primary config (conf/<stage>.yaml), so Hydra's overrides, multirun (-m), --cfg job and per-stage --help all work.
Errors meant for users (MsifError) are printed as one paragraph, without a traceback, and exit with status 2.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from msif import __version__
from msif.allocator import keep_freed_memory
from msif.config import CONF_DIR
from msif.console import print_error, terminal
from msif.errors import MsifError, SolverError, disk_error


@dataclass(frozen=True)
class Stage:
    summary: str
    entry: str  # "module:function" taking the composed config


STAGES = {
    "pretrain": Stage("train the embedding W and pretraining head U on the pretraining task", "msif.stages:pretrain"),
    "finetune": Stage(
        "train the finetune head Θ (and W when case=updated) from the pretrained W*", "msif.stages:finetune"
    ),
    "influence": Stage(
        "score every pretraining example's influence on the finetune test loss", "msif.stages:influence"
    ),
    "validate-loo": Stage(
        "check predicted influence against leave-one-out retraining (Pearson r)", "msif.stages:validate_loo"
    ),
    "validate-lds": Stage(
        "the linear datamodeling score: retrain on random subsets, correlate with predicted group effects",
        "msif.stages:validate_lds",
    ),
    "cleanse": Stage("remove the most harmful pretraining examples, retrain, compare accuracy", "msif.stages:cleanse"),
    "planted-faults": Stage(
        "flip a share of pretraining labels, retrain, and measure how many the scores find",
        "msif.stages:planted_faults",
    ),
    "reproduce": Stage(
        "run the paper's experiments (plan=cpu|full|paper|tiny) and write REPORT.md", "msif.stages.reproduce:reproduce"
    ),
}


DISTRIBUTED = ("influence",)  # the stages that shard their work under torchrun (msif/distributed.py)


def usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = [
        f"msif {__version__}: which pretraining examples made a finetuned model right or wrong",
        "(multi-stage influence functions, Chen et al. 2020).",
        "",
        "usage: msif <stage> [key=value ...] [group=option ...] [-m] [--help] [--cfg job]",
        "",
        "stages (each runs the ones before it when their results are missing):",
    ]
    lines += [f"  {name:<{width}}  {stage.summary}" for name, stage in STAGES.items()]
    lines += [
        "",
        "examples:",
        "  msif pretrain                                   # the embedded 8x8 digits, no download",
        "  msif finetune dataset=mnist case=updated seed=3  # MNIST from $MSIF_DATA",
        "  msif finetune -m case=fixed,updated             # a Hydra multirun sweep",
        "  msif finetune --help                            # the stage's config groups and options",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        print(f"msif {__version__}")
        return 0
    name, rest = args[0], args[1:]
    stage = STAGES.get(name)
    if stage is None:
        print_error(
            f"'{name}' is not an msif stage. The stages are: {', '.join(STAGES)}. Run `msif --help` for what each does."
        )
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and name not in DISTRIBUTED:
        print_error(
            f"`msif {name}` runs in one process, but it was started by torchrun with WORLD_SIZE="
            f"{os.environ['WORLD_SIZE']}. Under torchrun msif shards `msif influence`; run the other stages without "
            "torchrun (validate-loo and cleanse spread their retrains over loo.workers / cleanse.workers processes)."
        )
        return 2
    keep_freed_memory()  # page faults were a quarter of an HVP's CPU time (msif/allocator.py)
    try:
        return run_stage(name, stage.entry, rest)
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports, composing the config): nothing was written yet
        print_error(f"msif {name} was interrupted while starting; nothing was written. Rerun the command to start it.")
        return 130


_pending_interrupt = False  # a SIGINT that arrived while interrupts were deferred


def _hold_interrupt(signum, frame) -> None:
    global _pending_interrupt
    _pending_interrupt = True


def _raise_held_interrupt() -> None:
    global _pending_interrupt
    if _pending_interrupt:
        _pending_interrupt = False
        raise KeyboardInterrupt


@contextmanager
def deferred_interrupts():
    """Hold Ctrl-C while Hydra composes a config and raise it afterwards. A KeyboardInterrupt raised inside
    omegaconf's flag context managers leaves the config half-updated, and its cleanup then fails with an
    AttributeError: the user would see a traceback instead of "interrupted"."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # ignored (nohup) or someone else's
        yield
        return
    signal.signal(signal.SIGINT, _hold_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _raise_held_interrupt()


@contextmanager
def interrupts_allowed():
    """Inside `deferred_interrupts`: let Ctrl-C through (the stage itself), raising one that was held. Elsewhere
    (Ctrl-C ignored, as under nohup, or handled by someone else) it changes nothing."""
    if signal.getsignal(signal.SIGINT) is not _hold_interrupt:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _raise_held_interrupt()
        yield
    finally:
        signal.signal(signal.SIGINT, _hold_interrupt)


def run_stage(name: str, entry: str, overrides: list[str]) -> int:
    """Run one stage's Hydra app with `overrides` as its command line."""
    import hydra

    module, func = entry.split(":")
    fn = getattr(importlib.import_module(module), func)
    overrides, problem = with_config_dir(overrides)
    if problem:
        print_error(problem)
        return 2
    if not any(a.startswith("-") for a in overrides):  # flags (-m, --help, --cfg ...) are Hydra's to handle
        with deferred_interrupts():
            problem = startup_problem(name, overrides)
        if problem:
            print_error(problem)
            return 2

    @hydra.main(config_path=CONF_DIR, config_name=name.replace("-", "_"), version_base="1.3")
    def app(cfg) -> None:
        try:
            with interrupts_allowed(), terminal():
                fn(cfg)
        except MsifError as err:
            print_error(command_line_advice(err))
            raise SystemExit(2) from None
        except OSError as err:  # a full disk or a folder turned read-only mid-run: what happened, and what is kept
            print_error(disk_error(err).message)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print_error(
                f"msif {name} was interrupted. Files already on disk are complete (every write is a "
                "temporary file renamed into place); rerun the same command to continue."
            )
            raise SystemExit(130) from None

    saved = sys.argv
    sys.argv = [f"msif {name}", *overrides]
    try:
        with deferred_interrupts():  # Hydra composes the config again (and per job under -m) around `app`
            app()
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    finally:
        sys.argv = saved
    return 0


def with_config_dir(overrides: list[str]) -> tuple[list[str], str | None]:
    """`overrides` with the folder of the user's own configs (env MSIF_CONFIG_DIR) on Hydra's search path, so its
    dataset/, model/, experiment/ ... files are found beside msif's; a missing folder is a problem, not ignored."""
    folder = os.environ.get("MSIF_CONFIG_DIR")
    if not folder or any(o.startswith("hydra.searchpath") for o in overrides):
        return overrides, None
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        return overrides, (
            f"MSIF_CONFIG_DIR={folder} is not a folder. Point it at the folder holding your own configs (e.g. "
            "experiment/<name>.yaml, dataset/<name>.yaml), or unset it."
        )
    return [*overrides, f"hydra.searchpath=[file://{path}]"], None


def startup_problem(name: str, overrides: list[str]) -> str | None:
    """Why the command cannot start, as one paragraph: Hydra's complaint about `overrides` (an unknown group option,
    a key not in the config), or an output root that cannot be created."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=name.replace("-", "_"), overrides=overrides)
        root = Path(str(cfg.output_root)).expanduser()
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        text = " ".join(str(err).replace("\t", " ").split()).split(" Config search path:")[0]
        if "To append to your config use +" in text:  # a key msif does not have: a typo, not a key to add
            text = text.split(" To append")[0] + " msif has no such setting (`--cfg job` prints the ones it has)."
        return (
            f"The command line does not compose into a config: {text} Check the overrides "
            f"(`msif {name} --help` lists the config groups and their options)."
        )
    try:  # Hydra creates its run folder (the output root) before the stage can say anything
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return disk_error(err, "create the output root").message
    return None


def command_line_advice(err: MsifError) -> str:
    """The error's paragraph, with the command-line names of the solver settings it refers to."""
    if isinstance(err, SolverError) and err.hessian and err.keys:
        names = ", ".join(f"solver.{err.hessian}.{k}" for k in err.keys)
        return f"{err.message} On the command line: {names} (or solver=<name> for both Hessians)."
    return err.message


if __name__ == "__main__":
    sys.exit(main())
