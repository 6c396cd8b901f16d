"""The README's blocks as written: the Quickstart's Python runs (fewer members and steps) on the data it shows how to
get, its `dpdm downscale` line runs on that file, and every command line of every block names options its program
really has (dpdm's own, the training script's, and Accelerate's and torchrun's launchers)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def command_lines(text: str) -> list[list[str]]:
    """Each command of a bash block as argv (continuations joined, comments and shell variables dropped)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#") or re.match(r"^[A-Z0-9_]+=", line):
            continue
        try:
            argv = shlex.split(line)
        except ValueError:  # a line of a multi-line `python -c "..."`: not a command checked here
            assert not line.startswith(("dpdm", "accelerate", "torchrun")), line
            continue
        out.append([a for a in argv if not a.startswith("$")])
    return out


def test_the_quickstart_runs_as_written(tmp_path):
    pytest.importorskip("iris_sample_data")
    (tmp_path / "models").symlink_to(ROOT / "models", target_is_directory=True)
    quick = blocks("python")[:3]  # Quickstart, swapping samplers, diffusers' generic entry point
    code = "\n".join(quick)
    for long, short in {"num_members=10": "num_members=2", "num_inference_steps=10": "num_inference_steps=2"}.items():
        assert long in code  # the substitution must keep matching the README
        code = code.replace(long, short)
    code += "\nassert out.members.surface_temperature.dims == ('member', 'time', 'lat', 'lon')"
    code += "\nassert out.members.sizes['lat'] == 144 and type(pipe).__name__ == 'DownscalingPipeline'"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = command_lines(next(b for b in blocks("bash") if b.startswith("dpdm downscale coarse.nc")))[0]
    line = [{"10": "2"}.get(a, a) for a in line]  # --members 10 --steps 10 -> 2 and 2
    res = subprocess.run([sys.executable, "-m", "dpdm_diffusers.cli", *line[1:], "--quiet"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with xr.open_zarr(tmp_path / "fine.zarr") as fine:
        assert fine.surface_temperature.shape == (2, 1, 144, 192)  # the input's one member, downscaled x4


def option_names(params) -> set[str]:
    return {o for p in params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}


def test_every_command_line_in_the_readme_uses_real_options():
    import typer
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    from dpdm_diffusers.cli import app
    from dpdm_diffusers.training.config import build_parser

    dpdm = typer.main.get_command(app)
    launchers = {"accelerate": {a for x in launch_command_parser()._actions for a in x.option_strings},
                 "torchrun": {a for x in get_args_parser()._actions for a in x.option_strings}}
    training = {a for x in build_parser()._actions for a in x.option_strings}
    checked = 0
    for block in blocks("bash"):
        for argv in command_lines(block):
            if argv[0] == "dpdm":
                sub = dpdm.commands[argv[1]]  # KeyError: a command dpdm does not have
                known, rest = option_names(sub.params) | {"--help"}, argv[2:]
            elif argv[0] in launchers:
                split = argv.index("-m")
                launcher = [a.split("=")[0] for a in argv[1:split] if a.startswith("-")]
                assert set(launcher) <= launchers[argv[0]] | ({"launch"} if argv[0] == "accelerate" else set()), argv
                assert argv[split + 1] in ("dpdm_diffusers.cli", "dpdm_diffusers.training.train_dpdm"), argv
                if argv[split + 1] == "dpdm_diffusers.cli":
                    sub = dpdm.commands[argv[split + 2]]
                    known, rest = option_names(sub.params), argv[split + 3:]
                else:
                    known, rest = training, argv[split + 2:]
            else:
                continue
            used = {a.split("=")[0] for a in rest if a.startswith("--")}
            assert used <= known, f"{' '.join(argv)}: {sorted(used - known)} not options of it"
            checked += 1
    assert checked >= 25  # the README's dpdm, training and launcher lines were all found
