"""Bad inputs a new user gives the real CLI: each fails with its exit code and one message
naming the problem, and leaves every file the user had exactly as it was.

The table runs `unlearn_jax.cli.main` in-process (the same function the
`unlearn-jax` script calls); exit codes are those the process would exit with
(`SystemExit("error: ...")` exits 1, argparse and caught bad-input errors 2).
Almost every row fails before a model loads, so the module takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny_unlearn import REPO, config_fields, make_config, save_micro_pipeline

from unlearn_jax import cli
from unlearn_jax.trainer import experiment
from unlearn_jax.trainer.checkpoints import check_run_record
from unlearn_jax.trainer.restore import convert_model

CONFIG = f"{REPO / 'configs' / 'distill_project.py'}:runlocal"


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """A user's folder: a model, prompt files, noise, a run stopped before its first save."""
    root = tmp_path_factory.mktemp("user")
    model = save_micro_pipeline(root / "model")
    corrupt = shutil.copytree(model, root / "corrupt_model")
    unet = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])  # a download cut short
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    (root / "circles.txt").write_text("a red circle\na small green circle\n")
    other = shutil.copytree(model, root / "other_architecture")
    unet_config = json.loads((other / "unet" / "config.json").read_text())
    unet_config["sample_size"] = 16  # same weights, another model
    (other / "unet" / "config.json").write_text(json.dumps(unet_config))
    (root / "empty.txt").write_text("# nothing\n\n")
    (root / "latin1.txt").write_bytes("a red circle\na caf\xe9 on grey\n".encode("latin-1"))
    (root / "a_file").write_text("not a folder")
    (root / "pictures").mkdir()
    (root / "pictures" / "00000.png").write_bytes(b"my holiday photo")
    (root / "old_samples").mkdir()
    (root / "old_samples" / "images.npz").write_bytes(b"earlier results")
    (root / "exported").mkdir()
    (root / "exported" / "notes.txt").write_text("keep me")
    # Single files: ours, one cut short, a pickle, and three that are not SD 1.x/2.x models.
    single = convert_model(model, root / "model.safetensors")
    (root / "cut.safetensors").write_bytes(single.read_bytes()[:5000])
    (root / "model.ckpt").write_bytes(single.read_bytes())
    half = np.zeros((4, 4), np.float16)
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": half}, root / "lora.st")
    save_file({"conditioner.embedders.0.model.ln_final.weight": half}, root / "sdxl.safetensors")
    (root / "bad.ckpt").write_bytes((root / "sdxl.safetensors").read_bytes())
    save_file(
        {"encoder.down.0.block.0.conv1.weight": half, "decoder.up.0.x": half}, root / "vae.st"
    )
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(root / "noise.npy", noise)
    noise[0, 0, 0, 0] = np.nan
    np.save(root / "nan_noise.npy", noise)
    np.save(root / "flat_noise.npy", noise[0])
    (root / "noise.txt").write_text("0.1 0.2")
    # NaN at step 2 before the first save: the run record exists, no checkpoint does.
    stopped = root / "stopped_run"
    stopped.mkdir()
    cfg = make_config(model)
    spec = experiment.resolve_run(cfg)
    check_run_record(
        stopped, spec.fingerprint, json.loads(cfg.to_json_best_effort()), force_resume=False
    )
    return root


def snapshot(root: Path) -> dict[str, object]:
    """Every path under `root`: folders, and files' contents and modes."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return state


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status the process would have, everything it printed) of `unlearn-jax argv`."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    code = exit_info.value.code
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    if isinstance(code, str):  # Python prints the message to stderr and exits 1
        return 1, printed + code
    return code, printed


def _unlearn(*overrides: str, command: str = "unlearn", workdir: str = "{root}/new_run"):
    fields = [f"--config.{k}={v}" for k, v in config_fields(Path("{root}/model")).items()]
    return [command, "--config", CONFIG, "--workdir", workdir, *fields, *overrides]


SAMPLE = ["sample", "--model", "{root}/model", "--prompt", "a red circle"]
OUT = ["--out", "{root}/samples"]
INTEGRITY = ["integrity", "--original", "{root}/model", "--unlearned", "{root}/model"]
INTEGRITY += ["--prompt", "a dog"]
SAMPLE_FILE = ["sample", "--model", "{root}/model.safetensors", "--prompt", "a cat"]

ATTACK = ["attack", "--original", "{root}/model", "--unlearned", "{root}/model"]
ATTACK_OUT = ["--concept", "circle", "--out", "{root}/attacked"]

# (id, argv, exit status, message regex)
CASES = [
    (
        "attack-concept-absent",
        [*ATTACK, "--forget-prompts", "{root}/prompts.txt", *ATTACK_OUT],
        2,
        r"'circle' does not occur as a word in 1 of 2 forget prompts \('a blue square'\)",
    ),
    (
        "attack-empty-prompts",
        [*ATTACK, "--forget-prompts", "{root}/empty.txt", *ATTACK_OUT],
        2,
        r"the forget prompt set is empty",
    ),
    (
        "attack-architectures-differ",
        [
            "attack",
            "--original",
            "{root}/model",
            "--unlearned",
            "{root}/other_architecture",
            "--forget-prompts",
            "{root}/circles.txt",
            *ATTACK_OUT,
        ],
        2,
        r"different unet architectures \(config fields sample_size differ\)",
    ),
    (
        "attack-method-unknown",
        [*ATTACK, "--forget-prompts", "{root}/circles.txt", *ATTACK_OUT, "--method", "pgd"],
        2,
        r"invalid choice: 'pgd'",
    ),
    (
        "attack-steps-negative",
        [*ATTACK, "--forget-prompts", "{root}/circles.txt", *ATTACK_OUT, "--steps", "-1"],
        2,
        r"--steps: expected an integer >= 0",
    ),
    ("guidance-nan", [*SAMPLE, *OUT, "--guidance", "nan"], 2, r"--guidance.*finite.*>= 0"),
    ("guidance-inf", [*SAMPLE, *OUT, "--guidance", "inf"], 2, r"--guidance.*finite.*'inf'"),
    ("guidance-negative", [*SAMPLE, *OUT, "--guidance", "-1"], 2, r"--guidance.*>= 0.*'-1'"),
    ("steps-zero", [*SAMPLE, *OUT, "--steps", "0"], 2, r"--steps: expected an integer >= 1"),
    ("steps-negative", [*SAMPLE, *OUT, "--steps", "-3"], 2, r"--steps.*>= 1, got '-3'"),
    ("steps-not-a-number", [*SAMPLE, *OUT, "--steps", "many"], 2, r"--steps.*'many'"),
    ("images-per-prompt-zero", [*SAMPLE, *OUT, "--num-images-per-prompt", "0"], 2, r">= 1"),
    ("images-per-prompt-neg", [*SAMPLE, *OUT, "--num-images-per-prompt", "-2"], 2, r">= 1"),
    ("seed-negative", [*SAMPLE, *OUT, "--seed", "-1"], 2, r"--seed.*>= 0 and <= 4294967295"),
    ("seed-too-big", [*SAMPLE, *OUT, "--seed", str(2**40)], 2, r"--seed.*<= 4294967295"),
    ("height-zero", [*SAMPLE, *OUT, "--height", "0"], 2, r"--height.*>= 1"),
    ("width-negative", [*SAMPLE, *OUT, "--width", "-8"], 2, r"--width.*>= 1"),
    ("batch-size-zero", [*SAMPLE, *OUT, "--batch-size", "0"], 2, r"--batch-size.*>= 1"),
    ("eta-nan", [*SAMPLE, *OUT, "--eta", "nan"], 2, r"--eta.*>= 0 and <= 1"),
    ("eta-too-big", [*SAMPLE, *OUT, "--eta", "2"], 2, r"--eta.*<= 1"),
    ("scheduler-unknown", [*SAMPLE, *OUT, "--scheduler", "pndm"], 2, r"invalid choice: 'pndm'"),
    ("unknown-flag", [*SAMPLE, *OUT, "--colour", "red"], 2, r"unrecognized arguments: --colour"),
    (
        "prompt-file-missing",
        ["sample", "--model", "{root}/model", "--prompts", "{root}/promts.txt", *OUT],
        1,
        r"promts.txt does not exist: no such file",
    ),
    (
        "prompt-file-not-utf8",
        ["sample", "--model", "{root}/model", "--prompts", "{root}/latin1.txt", *OUT],
        1,
        r"latin1.txt, line 2: not UTF-8",
    ),
    (
        "prompt-file-empty",
        ["sample", "--model", "{root}/model", "--prompts", "{root}/empty.txt", *OUT],
        1,
        r"empty.txt.*holds no prompts|no prompts",
    ),
    ("prompt-empty", ["sample", "--model", "{root}/model", "--prompt", "", *OUT], 1, r"empty"),
    (
        "prompt-and-prompts",
        [*SAMPLE, "--prompts", "{root}/prompts.txt", *OUT],
        1,
        r"--prompt or --prompts, not both",
    ),
    ("no-prompt", ["sample", "--model", "{root}/model", *OUT], 1, r"no prompts"),
    ("out-is-a-file", [*SAMPLE, "--out", "{root}/a_file"], 1, r"a_file is a file, not a folder"),
    ("out-under-a-file", [*SAMPLE, "--out", "{root}/a_file/x"], 1, r"under .*a_file.*a file"),
    ("out-holds-user-png", [*SAMPLE, "--out", "{root}/pictures"], 1, r"holds 00000.png"),
    ("out-holds-results", [*SAMPLE, "--out", "{root}/old_samples"], 1, r"holds images.npz"),
    ("latents-nan", [*SAMPLE, *OUT, "--latents", "{root}/nan_noise.npy"], 1, r"1 NaN/inf"),
    ("latents-3d", [*SAMPLE, *OUT, "--latents", "{root}/flat_noise.npy"], 1, r"\[N, C, H/8"),
    ("latents-not-npy", [*SAMPLE, *OUT, "--latents", "{root}/noise.txt"], 1, r"not a readable"),
    ("latents-missing", [*SAMPLE, *OUT, "--latents", "{root}/z.npy"], 1, r"z.npy.*not a readable"),
    ("model-missing", ["sample", "--model", "{root}/nomodel", "--prompt", "a", *OUT], 2, "nomodel"),
    (
        "model-corrupt-safetensors",
        ["sample", "--model", "{root}/corrupt_model", "--prompt", "a cat", *OUT],
        2,
        r"corrupt_model/unet/diffusion_pytorch_model.safetensors is not a readable.*again",
    ),
    (
        "model-lora",
        ["sample", "--model", "{root}/lora.st", "--prompt", "a cat", *OUT],
        2,
        r"lora.st is a LoRA/LyCORIS adapter.*not a Stable Diffusion 1.x/2.x checkpoint",
    ),
    (
        "model-sdxl",
        ["sample", "--model", "{root}/sdxl.safetensors", "--prompt", "a cat", *OUT],
        2,
        r"is an SDXL checkpoint",
    ),
    (
        "model-vae-only",
        ["sample", "--model", "{root}/vae.st", "--prompt", "a cat", *OUT],
        2,
        r"vae.st is a VAE-only file",
    ),
    (
        "model-pickle-unreadable",
        ["sample", "--model", "{root}/bad.ckpt", "--allow-pickle", "--prompt", "a cat", *OUT],
        2,
        r"bad.ckpt is not a readable PyTorch checkpoint",
    ),
    (
        "model-single-file-truncated",
        ["sample", "--model", "{root}/cut.safetensors", "--prompt", "a cat", *OUT],
        2,
        r"cut.safetensors is truncated.*again",
    ),
    (
        "model-single-file-pickle",
        ["sample", "--model", "{root}/model.ckpt", "--prompt", "a cat", *OUT],
        2,
        r"model.ckpt is a pickled checkpoint.*--allow-pickle",
    ),
    (
        "model-single-file-no-prediction-type",
        ["sample", "--model", "{root}/model.safetensors", "--prompt", "a cat", *OUT],
        2,
        r"does not guess.*--prediction-type epsilon\|v_prediction",
    ),
    (
        "model-single-file-tiny-no-config",
        [*SAMPLE_FILE, "--prediction-type", "epsilon", *OUT],
        2,
        r"cannot be read from its tensors alone.*--model-config DIR",
    ),
    (
        "model-config-not-a-folder",
        [*SAMPLE_FILE, "--model-config", "{root}/pictures", *OUT],
        2,
        r"--model-config .*pictures has no unet/config.json",
    ),
    (
        "export-unet-only-of-a-folder",
        ["export", "--model", "{root}/model", "--format", "single-file", "--unet-only"]
        + ["--out", "{root}/u.safetensors"],
        2,
        r"--unet-only puts the UNet on top of the original single file",
    ),
    (
        "export-single-file-exists",
        ["export", "--model", "{root}/model", "--format", "single-file"]
        + ["--out", "{root}/model.safetensors"],
        2,
        r"model.safetensors exists; refusing to overwrite",
    ),
    (
        "export-single-file-not-safetensors",
        ["export", "--model", "{root}/model", "--format", "single-file", "--out", "{root}/m.ckpt"],
        2,
        r"name it m.safetensors",
    ),
    (
        "export-unet-only-folder-format",
        ["export", "--workdir", "{root}/stopped_run", "--unet-only", "--out", "{root}/out"],
        2,
        r"--unet-only applies to --format single-file",
    ),
    (
        "export-workdir-and-model",
        ["export", "--workdir", "{root}/stopped_run", "--model", "{root}/model"]
        + ["--out", "{root}/out"],
        1,
        r"--workdir DIR .* or --model PATH .*not both",
    ),
    (
        "export-model-flags-with-workdir",
        ["export", "--workdir", "{root}/stopped_run", "--ema", "--out", "{root}/out"],
        1,
        r"--ema apply to --model",
    ),
    ("integrity-seeds-zero", [*INTEGRITY, "--seeds", "0", *OUT], 2, r"--seeds.*>= 1"),
    ("integrity-guidance-nan", [*INTEGRITY, "--guidance", "nan", *OUT], 2, r"--guidance"),
    ("integrity-out-is-a-file", [*INTEGRITY, "--out", "{root}/a_file"], 1, r"is a file"),
    ("config-guidance-nan", _unlearn("--config.sample.guidance=nan"), 2, r"sample.guidance=nan"),
    ("config-steps-negative", _unlearn("--config.train.steps=-1"), 2, r"train.steps=-1.*>= 0"),
    ("config-batch-zero", _unlearn("--config.train.batch_size=0"), 2, r"train.batch_size=0"),
    ("config-eval-seeds-zero", _unlearn("--config.eval.seeds=0"), 2, r"eval.seeds=0.*>= 1"),
    ("config-lr-inf", _unlearn("--config.optim.lr=inf"), 2, r"optim.lr=inf.*finite"),
    ("config-seed-negative", _unlearn("--config.seed=-5"), 2, r"seed=-5.*>= 0"),
    ("config-mesh-data-zero", _unlearn("--config.mesh.data=0"), 2, r"mesh.data=0.*-1"),
    (
        "config-keep-fraction-zero",
        _unlearn("--config.unlearn.hparams.keep_fraction=0"),
        2,
        r"keep_fraction=0.0.*> 0 and <= 1",
    ),
    (
        "config-prompt-file-typo",
        _unlearn("--config.forget.prompts=forget_promts"),
        2,
        r"forget_promts does not exist: no such file; to give one prompt, pass a list",
    ),
    (
        "config-prompt-txt-missing",
        _unlearn("--config.retain.prompts=retain.txt"),
        2,
        r"retain.txt does not exist: no such file",
    ),
    (
        "config-prompt-file-not-utf8",
        _unlearn("--config.forget.prompts={root}/latin1.txt"),
        2,
        r"latin1.txt, line 2",
    ),
    ("config-field-typo", _unlearn("--config.train.stepz=3"), 2, r"no field 'train.stepz'"),
    (
        "evaluate-no-checkpoint",
        _unlearn(command="evaluate", workdir="{root}/stopped_run"),
        2,
        r"stopped_run holds no checkpoint.*train.steps=4.*unlearn-jax unlearn",
    ),
    (
        "evaluate-guidance-nan",
        _unlearn("--config.eval.guidance=nan", command="evaluate", workdir="{root}/stopped_run"),
        2,
        r"eval.guidance=nan",
    ),
    (
        "export-no-checkpoint",
        ["export", "--workdir", "{root}/stopped_run", "--out", "{root}/out"],
        2,
        r"stopped_run holds no checkpoint.*train.steps=4",
    ),
    (
        "export-not-a-workdir",
        ["export", "--workdir", "{root}/pictures", "--out", "{root}/out"],
        2,
        r"not the workdir of an unlearning run",
    ),
    (
        "export-out-is-a-file",
        ["export", "--workdir", "{root}/stopped_run", "--out", "{root}/a_file"],
        2,
        r"a_file is a file, not a folder",
    ),
    (
        "export-out-not-empty",
        ["export", "--workdir", "{root}/stopped_run", "--out", "{root}/exported"],
        2,
        r"exported exists and is not empty",
    ),
]


@pytest.mark.parametrize(
    ("argv", "status", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_fails_clearly_and_changes_nothing(user, capsys, argv, status, message):
    before = snapshot(user)
    argv = [a.replace("{root}", str(user)) for a in argv]
    code, printed = run_cli(argv, capsys)
    assert code == status, printed
    assert "Traceback" not in printed
    assert re.search(message, printed, re.S), printed
    assert snapshot(user) == before  # no file changed, none appeared (no empty --out/workdir)
