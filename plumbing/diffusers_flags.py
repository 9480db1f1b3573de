"""
The flags of diffusers' Diffusion-DPO scripts (examples/research_projects/diffusion_dpo:
train_diffusion_dpo.py for SD1.5, train_diffusion_dpo_sdxl.py) and the common ones of its LoRA
text-to-image scripts, as train.py takes them: each is accepted with the meaning it has there, or
refused with one line that says what to use instead and why. A name that means something else
here never passes silently. docs/from-diffusion-dpo.md lists the same table (a test compares them).

    kind     what happens
    alias    the same meaning as this project's flag `to` (argparse keeps one value for both)
    maps     accepted with its meaning there, turned into this project's setting `to` (see resolve)
    same     the same name and meaning here already
    refused  one line, exit code 2: `why`, and what to pass instead
"""
import argparse
import sys

# flag: (kind, to, why). For `alias`/`same` `to` is this project's flag; for `maps` the setting.
TABLE = {
    "--pretrained_model_name_or_path": ("alias", "--pretrained", ""),
    "--pretrained_vae_model_name_or_path": ("refused", "", "the VAE is kept in fp32 (bf16 under --mixed_precision "
                                            "bf16), so the fp16-fix VAE is not needed; to use another VAE, put it "
                                            "in the model folder's vae/ and pass --pretrained FOLDER"),
    "--revision": ("refused", "", "download that revision once (hf download ID --revision R --local-dir DIR) and "
                   "pass --pretrained DIR"),
    "--variant": ("refused", "", "the loader reads a model folder's default weights; download the variant into a "
                  "folder of its own and pass --pretrained DIR"),
    "--dataset_name": ("maps", "data", "pickapic:NAME: a hub id or folder with Pick-a-Pic's columns (caption, "
                       "jpg_0, jpg_1, label_0), as the scripts read it"),
    "--dataset_split_name": ("alias", "--data_split", ""),
    "--cache_dir": ("refused", "", "set HF_HOME (or HF_HUB_CACHE) for where downloads are kept"),
    "--train_data_dir": ("refused", "", "preference pairs come from --data (a .jsonl manifest, hf:DIR or pickapic:DIR)"),
    "--caption_column": ("refused", "", "name the columns with --data hf:DIR#prompt=COL,winner=COL,loser=COL"),
    "--image_column": ("refused", "", "name the columns with --data hf:DIR#prompt=COL,winner=COL,loser=COL"),
    "--max_train_samples": ("refused", "", "train on a smaller manifest or shard folder, or stop with --max_steps"),
    "--output_dir": ("alias", "--out_dir", ""),
    "--seed": ("same", "--seed", "0 when not given (the scripts: random); every draw derives from it"),
    "--resolution": ("same", "--resolution", "default: the preset's (512 sd15, 1024 sdxl)"),
    "--vae_encode_batch_size": ("refused", "", "the VAE encodes a micro-batch's winners and losers in one call; "
                                "lower --batch_size to lower its memory"),
    "--no_hflip": ("maps", "random_flip", "no flips (this project's default); without it the scripts flip, here "
                   "--random_flip flips winner and loser together"),
    "--random_flip": ("same", "--random_flip", "winner and loser flipped together"),
    "--random_crop": ("same", "--random_crop", "one random window for winner and loser"),
    "--center_crop": ("maps", "random_crop", "centre crops: the default here"),
    "--train_batch_size": ("alias", "--batch_size", ""),
    "--num_train_epochs": ("maps", "max_steps", "with no --max_steps: epochs × pairs in the data / pairs per step"),
    "--max_train_steps": ("alias", "--max_steps", ""),
    "--checkpointing_steps": ("alias", "--save_every", ""),
    "--checkpoints_total_limit": ("alias", "--keep_checkpoints", ""),
    "--resume_from_checkpoint": ("alias", "--resume", "latest (a fresh run when there is none), a folder, or "
                                 "checkpoint-N"),
    "--gradient_accumulation_steps": ("alias", "--grad_accum", ""),
    "--gradient_checkpointing": ("same", "--gradient_checkpointing", "the flag alone: every block"),
    "--beta_dpo": ("refused", "", "it means logit -beta·Δ in the SD1.5 script (default 2500) and -(beta/2)·Δ in the "
                   "SDXL and official scripts (default 5000); pass --beta, which is -(beta/2)·Δ: --beta 5000 for "
                   "either default, twice the SD1.5 script's value in general"),
    "--loss_type": ("maps", "loss", "sigmoid: the DPO loss (--loss dpo or rpo); hinge and ipo are not implemented"),
    "--learning_rate": ("alias", "--lr", ""),
    "--scale_lr": ("same", "--scale_lr", "lr × batch × accumulation × processes"),
    "--lr_scheduler": ("maps", "warmup_steps", "constant_with_warmup (this project's schedule) or constant (no "
                       "warm-up); other schedules are not implemented"),
    "--lr_warmup_steps": ("alias", "--warmup_steps", "linear warm-up, then constant"),
    "--lr_num_cycles": ("refused", "", "only for cosine_with_restarts, which is not implemented"),
    "--lr_power": ("refused", "", "only for the polynomial schedule, which is not implemented"),
    "--dataloader_num_workers": ("alias", "--num_workers", ""),
    "--use_8bit_adam": ("maps", "optimizer", "--optimizer adamw8bit (bitsandbytes)"),
    "--adam_beta1": ("same", "--adam_beta1", ""),
    "--adam_beta2": ("same", "--adam_beta2", ""),
    "--adam_weight_decay": ("alias", "--weight_decay", ""),
    "--adam_epsilon": ("alias", "--adam_eps", ""),
    "--max_grad_norm": ("same", "--max_grad_norm", ""),
    "--push_to_hub": ("same", "--push_to_hub", "uploads OUT_DIR at the end (huggingface_hub)"),
    "--hub_model_id": ("same", "--hub_model_id", "default: OUT_DIR's name"),
    "--hub_token": ("refused", "", "a token on the command line ends up in shell history and args.json; log in "
                    "with `hf auth login` or set HF_TOKEN"),
    "--logging_dir": ("same", "--logging_dir", "TensorBoard's folder, under OUT_DIR"),
    "--allow_tf32": ("maps", "", "accepted: TF32 matmuls are on by default on a GPU"),
    "--report_to": ("same", "--report_to", "none (default here), tensorboard or wandb"),
    "--mixed_precision": ("same", "--mixed_precision", "auto (default here) = bf16 on a GPU"),
    "--prior_generation_precision": ("refused", "", "DreamBooth's prior images; there are none in preference "
                                     "training"),
    "--local_rank": ("maps", "", "accepted: each process reads LOCAL_RANK from the environment (torchrun)"),
    "--enable_xformers_memory_efficient_attention": ("refused", "", "attention runs through PyTorch's fused SDPA "
                                                     "kernels; choose one with --sdpa_backend"),
    "--rank": ("alias", "--lora_rank", "the scripts always train a LoRA (default rank 4); here 0 = full fine-tune"),
    "--tracker_name": ("maps", "tracker_name", "the W&B project of --report_to wandb"),
    "--run_validation": ("maps", "validation_prompts", "validation grids of the built-in prompts (--validation_prompts "
                         "builtin) every --validation_steps steps and at the end"),
    "--validation_steps": ("alias", "--validation_every", "validate every N steps (the sampler's steps: "
                           "--validation_inference_steps)"),
    "--validation_prompt": ("maps", "validation_prompts", "one prompt (or 'a|b'), as --validation_prompts"),
    "--num_validation_images": ("maps", "validation_seeds", "N images a prompt: seeds 0 to N-1"),
    "--validation_epochs": ("refused", "", "validation is counted in steps here: --validation_every N"),
    "--proportion_empty_prompts": ("alias", "--caption_dropout", "a dropped caption gets what sampling guides "
                                   "against (SD1.5: \"\", SDXL: zeros)"),
    "--noise_offset": ("refused", "", "it changes the forward process the DPO and RPO losses are defined on"),
    "--snr_gamma": ("refused", "", "Min-SNR weighting changes the per-sample error E1; not part of the method"),
    "--prediction_type": ("refused", "", "the target follows the model's own scheduler (epsilon or v_prediction)"),
    "--use_ema": ("refused", "", "no EMA of the policy is kept"),
}

# The scripts' flags that set one of this project's settings under another dest: given with that
# setting's own flag (--data x --dataset_name y), one would silently win (checks.one_name_each
# refuses it). (--lr_scheduler and --run_validation are left out: the scripts pass them beside
# --lr_warmup_steps and --validation_prompt.)
SAME_SETTING = [(TABLE[flag][1], "diffusers_" + flag[2:]) for flag in
                ("--dataset_name", "--no_hflip", "--center_crop", "--use_8bit_adam", "--validation_prompt",
                 "--num_validation_images")]


def stop(message, prog="train.py"):
    """One line on stderr and exit code 2, as argparse's own last line (without its usage text)."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


class _Refuse(argparse.Action):
    """A refused flag: one line, exit code 2, as soon as the parser meets it."""

    def __call__(self, parser, namespace, values, option_string=None):
        stop(f"{option_string} is not taken: {TABLE[option_string][2]}", parser.prog)


def add_flags(p):
    """The scripts' flags that train.py's own flags do not already spell, as one --help group."""
    ours = {s: a for a in p._actions for s in a.option_strings}
    g = p.add_argument_group("flags of diffusers' Diffusion-DPO and LoRA scripts "
                             "(docs/from-diffusion-dpo.md: what each does here)")
    for flag, (kind, to, why) in TABLE.items():
        if flag in ours:
            continue
        if kind == "refused":
            g.add_argument(flag, nargs="?", action=_Refuse, help=f"refused: {why}")
        elif kind == "alias":
            target = ours[to]
            if target.nargs == 0:  # a switch
                g.add_argument(flag, dest=target.dest, action="store_const", const=target.const,
                               default=argparse.SUPPRESS, help=f"= {to}")
            else:
                g.add_argument(flag, dest=target.dest, type=target.type, nargs=target.nargs, const=target.const,
                               default=argparse.SUPPRESS, help=f"= {to}")
        elif kind == "maps":
            if flag in ("--no_hflip", "--center_crop", "--use_8bit_adam", "--allow_tf32", "--run_validation"):
                g.add_argument(flag, dest="diffusers_" + flag[2:], action="store_true", help=why)
            else:
                number = flag in ("--num_train_epochs", "--local_rank", "--num_validation_images")
                g.add_argument(flag, dest="diffusers_" + flag[2:], type=int if number else str, help=why)


def resolve(args, error):
    """The scripts' settings that need more than a new name, into this project's (error(msg): one line)."""
    get = lambda name: getattr(args, "diffusers_" + name, None)
    if get("dataset_name") is not None:
        args.data = f"pickapic:{get('dataset_name')}"
    if get("no_hflip"):
        args.random_flip = False
    if get("center_crop"):
        args.random_crop = False
    if get("use_8bit_adam"):
        args.optimizer = "adamw8bit"
    if get("loss_type") not in (None, "sigmoid"):
        error(f"--loss_type {get('loss_type')}: not implemented; the sigmoid (DPO) loss is --loss dpo, and RPO's is "
              f"--loss rpo")
    if get("lr_scheduler") not in (None, "constant", "constant_with_warmup"):
        error(f"--lr_scheduler {get('lr_scheduler')}: not implemented; the schedule here is constant_with_warmup "
              f"(--warmup_steps) or constant")
    if get("lr_scheduler") == "constant":  # diffusers' constant ignores the warm-up steps
        args.warmup_steps = 0
    if get("tracker_name") is not None:
        args.tracker_name = get("tracker_name")
    if get("run_validation") and args.validation_prompts is None:
        args.validation_prompts = "builtin"
    if get("validation_prompt") is not None:
        args.validation_prompts = get("validation_prompt")
    if get("num_validation_images") is not None:
        if get("num_validation_images") < 1:
            error("--num_validation_images must be at least 1")
        args.validation_seeds = f"0-{get('num_validation_images') - 1}"
    if get("local_rank") is not None and not -1 <= get("local_rank") < 2 ** 31:  # (its value is otherwise unused)
        error(f"--local_rank must be -1 or a rank, not {get('local_rank')}")
    args.num_train_epochs = get("num_train_epochs")
    for key in [k for k in vars(args) if k.startswith("diffusers_")]:
        delattr(args, key)  # (args.json holds this project's settings only)
