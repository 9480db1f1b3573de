"""
Flags checked before anything heavy loads (models, data), one line each through argparse (exit code 2):
train.py's numbers in their ranges, every choice one that exists, the folders a run writes creatable
and writable, a validation prompts file readable (check_train_flags; what needs the model presets,
the objectives, the sampler or the reward models train.py checks itself, in check_flags); a flag
given under two names (one_name_each); the other programs' numbers (plain_numbers).
"""
import argparse
import math
import os

import torch

from plumbing import files, hub, parallel, speed


class Parser(argparse.ArgumentParser):
    """train.py's parser. Under torchrun every rank parses the same flags and finds the same error:
    each node's local rank 0 says it, the others end with the same exit code 2 in silence (not one
    usage text and line per process)."""

    def error(self, message):
        if os.environ.get("LOCAL_RANK", "0") != "0":
            self.exit(2)
        super().error(message)


MAX_RESOLUTION = 4096  # --resolution: above it one image (and the UNet's activations) outgrows any machine
MAX_ITEMS = 10_000_000  # --num_items: a toy epoch's order (a permutation of that many indices) is built in memory


def check_train_flags(p, args):
    """train.py's flags that need nothing of the six (p: the parser, whose error() makes the one line)."""
    for name in ("batch_size", "grad_accum", "max_steps", "keep_checkpoints", "max_bad_steps", "num_train_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    for name in ("warmup_steps", "save_every", "seed", "log_every", "validation_every"):  # (--num_workers: its type)
        if getattr(args, name) < 0:
            p.error(f"--{name} must be 0 or more, not {getattr(args, name)}")
    for name in ("lr", "max_grad_norm"):  # (nan fails every comparison: refused too)
        if not 0 < getattr(args, name) < float("inf"):
            p.error(f"--{name} must be a positive finite number, not {getattr(args, name)}")
    for name in ("caption_dropout", "style_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name} is a probability: between 0 and 1, not {getattr(args, name)}")
    if args.gradient_checkpointing != "auto" and not speed.checkpointing_ok(args.gradient_checkpointing):
        p.error(f"--gradient_checkpointing {args.gradient_checkpointing}: choose {', '.join(speed.CHECKPOINTING)} or "
                f"transformer:F with 0 < F <= 1")
    if args.device not in ("auto", "cpu") and not parallel.device_exists(args.device):
        p.error(f"--device {args.device}: no such device here (auto, cpu" + (", cuda, cuda:N" if torch.cuda.is_available()
                                                                               else "; no GPU is visible") + ")")
    if args.lora_rank < 0:
        p.error("--lora_rank must be 0 (full fine-tune) or positive")
    if args.lora_alpha is not None and args.lora_rank == 0:
        p.error("--lora_alpha needs --lora_rank")
    if args.push_to_hub and hub.offline():  # (found now, not after the run)
        p.error("--push_to_hub needs the hub, and HF_HUB_OFFLINE is set")
    if args.fsdp and args.lora_rank:
        p.error("--fsdp shards a full fine-tune; a LoRA's trainable part is small, train it with plain DDP")
    if args.fsdp and args.mixed_precision == "fp16":  # (fp16's scaler could skip a step on some ranks only)
        p.error("--fsdp with --mixed_precision fp16 is not supported; use bf16")
    args.lora_targets = ",".join(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.data in ("toy", "toy-base") and args.data_split not in ("train", "test", "all"):
        p.error(f"--data_split {args.data_split!r}: the toy sets' prompt splits are train, test and all")
    if args.validation_prompts is not None and args.data.startswith("cache:"):
        p.error("--validation_prompts needs the VAE and text encoders, which --data cache:DIR does without")
    if args.validation_metric != "none" and args.validation_prompts is None:
        p.error(f"--validation_metric {args.validation_metric} scores validation images: pass --validation_prompts "
                f"(e.g. toy-test, builtin)")
    _check_more(p, args)


def _check_more(p, args):
    """What the checks above leave open, before anything loads: every number finite and within
    int32 (--seed: uint32), the optimizer's settings in their ranges, the folders a run writes
    creatable and writable, a validation prompts file readable. One line each (argparse's exit 2)."""
    for action in p._actions:
        value = getattr(args, action.dest, None)
        if action.type is float and value is not None and not math.isfinite(value):
            p.error(f"{action.option_strings[0]} must be a finite number, not {value}")
        top = 2 ** 32 - 1 if action.dest == "seed" else 2 ** 31 - 1
        if action.type is int and value is not None and abs(value) > top:
            p.error(f"{action.option_strings[0]} must be at most {top}, not {value}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name} must be at least 0 and below 1, not {getattr(args, name)}")
    if not args.adam_eps > 0:
        p.error(f"--adam_eps must be a positive finite number, not {args.adam_eps}")
    if args.weight_decay < 0:
        p.error(f"--weight_decay must be 0 or more, not {args.weight_decay}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        p.error(f"--lora_alpha must be positive, not {args.lora_alpha}")
    for name in ("num_items", "shuffle_window", "shuffle_buffer", "validation_inference_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    for name, top, why in (("resolution", MAX_RESOLUTION, "each image is held and rendered at that size"),
                           ("num_items", MAX_ITEMS, "an epoch's order is held in memory")):
        if (getattr(args, name) or 0) > top:
            p.error(f"--{name} must be at most {top} ({why}), not {getattr(args, name)}")
    if args.validation_inference_steps > 1000:  # (the schedulers' training timesteps: a sampler cannot take more)
        p.error(f"--validation_inference_steps must be at most 1000, not {args.validation_inference_steps}")
    if args.validation_guidance is not None and not 0 <= args.validation_guidance <= 100:
        p.error(f"--validation_guidance must be between 0 and 100, not {args.validation_guidance}")
    logs = os.path.normpath(args.logging_dir or ".")
    if args.report_to == "tensorboard" and (os.path.isabs(logs) or logs == "." or logs.split(os.sep)[0] == ".."):
        p.error(f"--logging_dir {args.logging_dir!r}: name a folder inside --out_dir (e.g. logs); a run writes only there")
    for flag, names in (("--init", ()), ("--embed_model", ("tiny", "toy-clip", "random"))):
        value = getattr(args, flag[2:])  # (found now, not after the pipeline, which both are loaded after)
        if value and value not in names and not os.path.exists(value) and not hub.HUB_ID.fullmatch(value):
            p.error(f"{flag} {value}: no such folder (nor a hub id of the form owner/name)")
    problem = files.folder_problem(args.out_dir, "--out_dir")
    problem = problem or hub.pickled_flags_problem(args, ("--init", "--pretrained", "--embed_model"))
    problem = problem or (args.validation_prompts is not None and
                          files.text_file_problem(args.validation_prompts, "--validation_prompts"))
    if problem:
        p.error(problem.removeprefix("error: "))


def validation_grid(p, args, most):
    """The validation images (prompts × seeds) are made at once and shown in one grid: at most MOST
    (sample.py's GRID_MAX), refused before the run rather than at its last step, before the final save."""
    n = len(args.validation_prompts) * len(args.validation_seeds)
    if n > most:
        p.error(f"--validation_prompts × --validation_seeds make {len(args.validation_prompts)} × "
                f"{len(args.validation_seeds)} = {n} images; a validation grid holds at most {most}: pass fewer "
                f"prompts or seeds (sample.py makes any number from a checkpoint)")


# ---------------------------------------------------------------------------------------
# One flag, one name per command line. argparse keeps the last value of a flag it is given twice;
# given under two of its names (--lr 1e-5 --learning_rate 1e-3) that is a silent choice between
# two settings the user wrote. (The same name twice is argparse's own rule, "the later wins", as in
# a script that appends an override to its base flags.)
def one_name_each(p, same=()):
    """From now on, p's parse_args refuses (p.error: one line, exit 2) a flag given under two of
    its names. same: groups of dests that are one setting (a diffusers flag mapped onto ours, e.g.
    ("data", "diffusers_dataset_name")): two names among a group's flags are refused too."""
    given = {}
    group_of = {dest: group[0] for group in same for dest in group}
    for action in p._actions:
        if not action.option_strings or type(action).__name__ == "_HelpAction":
            continue

        class Noted(type(action)):
            def __call__(self, parser, namespace, values, option_string=None, _base=type(action)):
                key = group_of.get(self.dest, self.dest)
                names = given.setdefault(key, [])
                other = next((n for n in names if n != option_string), None)
                if other is not None:
                    parser.error(f"{other} and {option_string} set one setting ({key}); given both, the later "
                                 f"would win without a word: pass one of them")
                names.append(option_string)
                return _base.__call__(self, parser, namespace, values, option_string)
        action.__class__ = Noted
    parse_known_args = p.parse_known_args

    def parse_fresh(*a, **k):  # (every parse starts with nothing seen)
        given.clear()
        return parse_known_args(*a, **k)
    p.parse_known_args = parse_fresh
    return p


def plain_numbers(p, args, positive=(), non_negative=()):
    """The number checks train.py makes, for the other programs (tools/, bench/): every int flag
    within int32 (--seed: uint32), every float flag finite, POSITIVE ones at least 1 (ints) or above
    0 (floats), NON_NEGATIVE ones 0 or more. One line each through p.error (exit 2), before
    anything loads."""
    for action in p._actions:
        value = getattr(args, action.dest, None)
        if value is None or action.type not in (int, float):
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        if action.type is float and not math.isfinite(value):
            p.error(f"{flag} must be a finite number, not {value}")
        top = 2 ** 32 - 1 if action.dest == "seed" else 2 ** 31 - 1
        if abs(value) > top:
            p.error(f"{flag} must be at most {top}, not {value}")
        if action.dest in positive and not value > 0:
            p.error(f"{flag} must be {'at least 1' if action.type is int else 'above 0'}, not {value}")
        if action.dest in non_negative and value < 0:
            p.error(f"{flag} must be 0 or more, not {value}")
