"""``flash-dist slurm`` without a cluster: the rendered script, its quoting, and the errors.

The quoting tests run the rendered script with bash, with stand-ins for ``srun`` and ``scontrol``
that record what they were given, so they check what the shell really does with each value.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from flash_dist import slurm
from flash_dist.cli import main as cli_main

RECIPE = """\
model: {{name: tiny}}
data: {{path: data/tiny}}
trainer: {{devices: {devices}, num_nodes: {nodes}, accelerator: {accelerator}, default_root_dir: {root}}}
"""


def write_recipe(folder: Path, name="tiny.yaml", devices=2, nodes=1, accelerator="cpu", root="runs/tiny") -> Path:
    path = folder / name
    path.write_text(RECIPE.format(devices=devices, nodes=nodes, accelerator=accelerator, root=root))
    return path


def stubs(folder: Path) -> Path:
    """``srun`` that writes its arguments (NUL-separated) and a few variables; ``scontrol show hostnames``."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/sh\nprintf "%s\\0" "$@" > "$STUB_OUT/argv"\n'
        'printf "%s\\n" "$MASTER_ADDR" "$MASTER_PORT" "$NCCL_NVLS_ENABLE" "$OMP_NUM_THREADS" > "$STUB_OUT/env"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "n1\\nn2\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def run_script(text: str, folder: Path, **env) -> tuple[list[str], list[str]]:
    """Run the script with bash as Slurm would (job 4242 on n[1-2]); srun's argv and recorded variables."""
    script = folder / "job.sbatch"
    script.write_text(text)
    out = folder / "out"
    out.mkdir(exist_ok=True)
    bin_dir = folder / "bin" if (folder / "bin").exists() else stubs(folder)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_", "OMP_"))}
    full_env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_OUT": str(out), "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NODELIST": "n[1-2]", **env}
    res = subprocess.run(["bash", str(script)], cwd=folder, env=full_env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    argv = (out / "argv").read_bytes().decode().split("\0")[:-1]
    return argv, (out / "env").read_text().splitlines()


def render(recipe: Path, overrides=(), **kw) -> str:
    kw.setdefault("nodes", 1)
    kw.setdefault("gpus_per_node", 2)
    return slurm.render(slurm.plan(recipe, overrides=list(overrides), workdir=recipe.parent, **kw))


def directives(text: str) -> list[str]:
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")]


def test_gpu_script_asks_for_one_task_per_gpu_and_requeue(tmp_path):
    recipe = write_recipe(tmp_path, devices=4, nodes=2, accelerator="gpu")
    text = render(recipe, nodes=2, gpus_per_node=4, partition="gpu", time="04:00:00", account="proj-1",
                  cpus_per_task=8)
    run_dir = tmp_path / "runs" / "tiny"
    assert directives(text) == [
        "--job-name=flash-dist-tiny", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8",
        "--partition=gpu", "--account=proj-1", "--time=04:00:00", f"--chdir={tmp_path}",
        f"--output={run_dir}/slurm/%x-%j.out", "--open-mode=append", "--signal=USR1@90", "--requeue"]
    argv, env = run_script(text, tmp_path)
    assert argv == ["--kill-on-bad-exit=1", sys.executable, "-m", "flash_dist.cli", "train", str(recipe),
                    "trainer.num_nodes=2", "trainer.devices=4"]
    # MASTER_ADDR: first host of the allocation; port from the job id; NVLink multicast off; threads per task
    assert env == ["n1", str(15000 + 4242), "0", "1"]


def test_nccl_nvls_can_be_turned_on_and_master_addr_given(tmp_path):
    recipe = write_recipe(tmp_path)
    text = render(recipe, master_addr="127.0.0.1", master_port=29511)
    _, env = run_script(text, tmp_path, NCCL_NVLS_ENABLE="1", SLURM_CPUS_PER_TASK="3")
    assert env == ["127.0.0.1", "29511", "1", "3"]


def test_cpu_recipe_requests_no_gpus(tmp_path):
    text = render(write_recipe(tmp_path, devices=1, nodes=2), nodes=2, gpus_per_node=1)
    assert "--ntasks-per-node=1" in directives(text)
    assert not any(d.startswith("--gpus") for d in directives(text))


@pytest.mark.parametrize("value", [
    "a b; touch PWNED", "x'; touch PWNED; echo '", "$(touch PWNED)", 'q"uo"te && touch PWNED',
    "a\\ b | touch PWNED", "a `touch PWNED`", "$HOME", "a*"])
def test_override_values_stay_one_argument(tmp_path, value):
    recipe = write_recipe(tmp_path)
    override = f"logging.run_name={value}"
    argv, _ = run_script(render(recipe, [override]), tmp_path)
    assert argv[6:] == [override, "trainer.num_nodes=1", "trainer.devices=2"]
    assert not (tmp_path / "PWNED").exists()


def test_recipe_path_with_shell_characters(tmp_path):
    recipe = write_recipe(tmp_path, name="my recipe;touch PWNED.yaml")
    text = render(recipe)
    argv, _ = run_script(text, tmp_path)
    assert argv[5] == str(recipe)
    assert not (tmp_path / "PWNED").exists()
    assert "--job-name=flash-dist-my-recipe-touch-PWNED" in directives(text)


def test_run_dir_that_sbatch_lines_cannot_carry_is_refused(tmp_path):
    recipe = write_recipe(tmp_path, root="'runs/a b;touch PWNED'")
    with pytest.raises(slurm.SlurmError, match=r"trainer.default_root_dir: .*a b;touch PWNED.*use only letters"):
        render(recipe)


@pytest.mark.parametrize("option, value", [("partition", "gpu a"), ("time", "1:00\n#SBATCH --x"),
                                           ("account", "a;b"), ("job_name", "my job")])
def test_directive_values_are_checked(tmp_path, option, value):
    with pytest.raises(slurm.SlurmError, match=f"--{option.replace('_', '-')}: "):
        render(write_recipe(tmp_path), **{option: value})


def test_control_characters_in_overrides_are_refused(tmp_path):
    with pytest.raises(slurm.SlurmError, match="override: .*control character"):
        render(write_recipe(tmp_path), ["logging.run_name=a\nb"])


def test_devices_mismatch_names_both_values(tmp_path, capsys):
    recipe = write_recipe(tmp_path, devices=2)
    rc = cli_main(["slurm", str(recipe), "--nodes", "1", "--gpus-per-node", "4", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--gpus-per-node 4 does not match the recipe's trainer.devices=2" in err


def test_nodes_mismatch_names_both_values(tmp_path):
    with pytest.raises(slurm.SlurmError, match=r"--nodes 2 does not match the recipe's trainer.num_nodes=1"):
        render(write_recipe(tmp_path), nodes=2)


def test_overrides_make_the_recipe_fit(tmp_path):
    recipe = write_recipe(tmp_path, devices=2, nodes=1)
    argv, _ = run_script(render(recipe, ["trainer.devices=1", "trainer.num_nodes=2"], nodes=2, gpus_per_node=1),
                         tmp_path)
    assert argv[6:] == ["trainer.devices=1", "trainer.num_nodes=2", "trainer.num_nodes=2", "trainer.devices=1"]


def test_auto_devices_become_gpus_per_node(tmp_path):
    recipe = write_recipe(tmp_path, devices="auto", accelerator="auto")
    text = render(recipe, gpus_per_node=8)
    assert "--gpus-per-node=8" in directives(text) and text.rstrip().count("trainer.devices=8") == 1


def test_missing_recipe(tmp_path, capsys):
    rc = cli_main(["slurm", str(tmp_path / "nope.yaml"), "--nodes", "1", "--gpus-per-node", "1", "--dry-run"])
    assert rc == 2
    assert f"recipe {str(tmp_path / 'nope.yaml')!r} not found" in capsys.readouterr().err


def test_bad_override_is_a_config_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    rc = cli_main(["slurm", str(recipe), "--nodes", "1", "--gpus-per-node", "2", "--dry-run", "trainer.devicez=2"])
    assert rc == 2
    assert "unknown key 'trainer.devicez'" in capsys.readouterr().err


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path)
    rc = cli_main(["slurm", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "2", "--dry-run", "optim.lr=1e-3"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("#!/bin/bash\n") and "optim.lr=1e-3" in out and str(recipe) in out
    assert not (tmp_path / "runs").exists()


def test_no_sbatch_writes_the_script_and_says_how_to_submit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    write_recipe(tmp_path)
    rc = cli_main(["slurm", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "2"])
    captured = capsys.readouterr()
    script = tmp_path / "runs" / "tiny" / "slurm" / "flash-dist-tiny.sbatch"
    assert rc == 1
    assert f"sbatch not found on PATH; the job script is written: submit it by hand with `sbatch {script}`" \
        in captured.err
    assert script.is_file() and os.access(script, os.X_OK)


def test_submit_prints_job_id_and_log(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(tmp_path))}/sbatch.args\n'
                                    'echo "731;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    write_recipe(tmp_path)
    rc = cli_main(["slurm", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "2"])
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny" / "slurm"
    assert rc == 0
    assert out.splitlines() == [f"job script: {run_dir}/flash-dist-tiny.sbatch", "submitted job 731",
                                f"log: {run_dir}/flash-dist-tiny-731.out"]
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", f"{run_dir}/flash-dist-tiny.sbatch"]


def test_failed_sbatch_is_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "sbatch: error: invalid partition specified: gpu" >&2\nexit 1\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    write_recipe(tmp_path)
    rc = cli_main(["slurm", "tiny.yaml", "--nodes", "1", "--gpus-per-node", "2", "--partition", "gpu"])
    assert rc == 2
    assert "invalid partition specified: gpu" in capsys.readouterr().err


def test_missing_template_names_the_option(tmp_path):
    job = slurm.plan(write_recipe(tmp_path), nodes=1, gpus_per_node=2, workdir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"sbatch template .*nope.sbatch not found: .*pass --template PATH"):
        slurm.render(job, tmp_path / "nope.sbatch")
