"""`unlearn-jax attack`: recover an erased concept from an unlearned model, report next to it.

    unlearn-jax attack --original DIR --unlearned DIR --forget-prompts FILE --concept NAME
                       --method embedding|context --steps N --out DIR

Writes DIR/attack.json (forget_rate, forget_rate_attacked, forget_rate_original,
the attack's steps, time and settings, a per-prompt table) and DIR/grid.png
(original | unlearned | unlearned under attack, same noise). The attack's orbax
state lives in DIR/checkpoints: an interrupted attack resumes when rerun.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unlearn_jax.command_args import (
    GUIDANCE,
    POSITIVE_INT,
    SEED,
    add_model_args,
    devices_for,
    fresh_output,
    load_model,
    number,
)

log = logging.getLogger(__name__)
RESULT_FILES = ("attack.json", "grid.png")


def _check_same_architecture(original, unlearned) -> None:
    for name in ("unet", "text_encoder", "vae"):
        a, b = dict(getattr(original, name).config), dict(getattr(unlearned, name).config)
        if a != b:
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(
                f"the original and the unlearned model have different {name} architectures "
                f"(config fields {', '.join(fields[:6])} differ). Fix: pass the unlearned copy "
                "of --original (e.g. `unlearn-jax export` of a run on that model)."
            )
    if original.tokenizer.get_vocab() != unlearned.tokenizer.get_vocab():
        raise ValueError(
            "the original and the unlearned model have different tokenizers. Fix: pass the "
            "unlearned copy of --original."
        )


def run_attack_command(args: argparse.Namespace) -> None:
    """Loads both models, attacks the unlearned one, writes attack.json and grid.png."""
    from flax import nnx

    from unlearn_jax.attacks.evaluation import evaluate_attack, write_attack_report
    from unlearn_jax.attacks.prompts import check_forget_prompts
    from unlearn_jax.attacks.run import AttackSettings, run_attack
    from unlearn_jax.data.cache import model_key
    from unlearn_jax.data.prompts import PromptSetError, read_prompt_file
    from unlearn_jax.data.sources import generated_latents
    from unlearn_jax.metrics.integrity import IntegritySettings
    from unlearn_jax.trainer.evaluation import forget_classifier
    from unlearn_jax.trainer.sharding import make_mesh

    try:
        prompts = read_prompt_file(args.forget_prompts)
    except PromptSetError as e:
        raise SystemExit(f"error: --forget-prompts: {e}") from None
    check_forget_prompts(prompts, args.concept)  # before any model loads
    settings = AttackSettings(
        method=args.method,
        steps=args.steps,
        tokens=args.tokens,
        lr=args.lr if args.lr is not None else (5e-3 if args.method == "embedding" else 1e-2),
        batch_size=args.batch_size,
        epsilon=args.epsilon,
        init_word=args.init_word,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    fresh_output(args.out, list(RESULT_FILES))
    folders, _ = devices_for([args.original, args.unlearned], args)
    original = load_model(folders[0], args)
    unlearned = load_model(folders[1], args)
    _check_same_architecture(original, unlearned)
    classifier, concept_index = forget_classifier(args.classifier, args.concept, original)
    mesh = make_mesh(-1, 1)
    cache = args.out / "cache"
    x0 = generated_latents(
        original,
        prompts,
        per_prompt=args.images_per_prompt,
        steps=args.sample_steps,
        guidance=args.guidance,
        seed=args.seed + 1,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        cache_dir=cache,
        model_id=model_key(folders[0]),
        progress=False,
    )
    outcome = run_attack(
        unlearned,
        nnx.state(unlearned.unet),
        prompts,
        args.concept,
        x0,
        settings,
        workdir=args.out,
        fingerprint={"original": model_key(folders[0]), "unlearned": model_key(folders[1])},
        mesh=mesh,
        progress=print,
    )
    sampling = IntegritySettings(
        seeds=args.seeds,
        steps=args.eval_steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        height=args.height,
        width=args.width,
    )
    summary, images = evaluate_attack(
        unlearned,
        nnx.state(unlearned.unet),
        outcome,
        prompts,
        classifier,
        concept_index,
        sampling,
        original_pipe=original,
        mesh=mesh,
    )
    summary.update(
        concept=args.concept,
        classifier=args.classifier,
        original=str(folders[0]),
        unlearned=str(folders[1]),
    )
    write_attack_report(summary, images, prompts, args.out, seeds=args.seeds)
    line = (
        f"forget rate {summary['forget_rate']:.2f} -> {summary['forget_rate_attacked']:.2f} "
        f"under the {args.method} attack ({outcome.steps} steps, {outcome.seconds:.0f} s); "
        f"original {summary['forget_rate_original']:.2f}"
    )
    if "template_rate" in summary:
        line += f"; '{summary['template']}' alone {summary['template_rate']:.2f}"
    print(line)
    print(f"wrote {args.out / 'attack.json'} and {args.out / 'grid.png'}")


def add_attack_command(sub: argparse._SubParsersAction) -> None:
    """Registers `unlearn-jax attack`."""

    p = sub.add_parser(
        "attack",
        help="try to recover the erased concept (textual inversion or context perturbation)",
        description="Attacks an unlearned model with a concept-recovery attack and reports the "
        "forget rate with and without it, from the same noise.",
    )
    p.add_argument("--original", required=True, help="the model before unlearning (θ0)")
    p.add_argument("--unlearned", required=True, help="the unlearned diffusers folder (export)")
    p.add_argument("--forget-prompts", type=Path, required=True, help="file, one prompt a line")
    p.add_argument("--concept", required=True, help="the erased concept's word, e.g. circle")
    p.add_argument("--method", choices=("embedding", "context"), default="embedding")
    p.add_argument(
        "--steps", type=number(int, 0), default=100, help="attack steps (>= 0; default 100)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=number(int, 0), default=1, help="k learned tokens")
    p.add_argument(
        "--lr",
        type=number(float, 0.0, above=True),
        default=None,
        help="Adam learning rate (default 5e-3 embedding, 1e-2 context)",
    )
    p.add_argument(
        "--epsilon",
        type=number(float, 0.0),
        default=0.1,
        help="context attack: per-token bound on ||δ|| relative to ||c|| (default 0.1)",
    )
    p.add_argument("--init-word", default="", help="v*'s initial word (default: the concept)")
    p.add_argument("--seed", type=SEED, default=0, help="batch order, noise, θ0's images")
    p.add_argument("--images-per-prompt", type=POSITIVE_INT, default=2, help="θ0 images per prompt")
    p.add_argument("--sample-steps", type=POSITIVE_INT, default=10, help="θ0 images' steps")
    p.add_argument("--eval-steps", type=POSITIVE_INT, default=10, help="evaluation steps")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1, help="eval images per prompt")
    p.add_argument("--guidance", type=GUIDANCE, default=4.0)
    p.add_argument("--height", type=POSITIVE_INT, default=None)
    p.add_argument("--width", type=POSITIVE_INT, default=None)
    p.add_argument(
        "--classifier",
        default="world_shape",
        help="a registered forget classifier (eval.classifier names; default world_shape)",
    )
    p.add_argument("--checkpoint-every", type=number(int, 0), default=0, help="0: save at the end")
    add_model_args(p)
    p.set_defaults(func=run_attack_command)
