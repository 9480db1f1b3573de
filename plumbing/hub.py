"""
Loading from the Hugging Face hub or a local diffusers folder, and the rules every loader shares:
whether the hub may be asked (offline), how a failure is told (one line, first_line), and
whether a weights file is whole (safetensors_problem). model.py calls these; a reader of the
method can skip this file.
"""
import contextlib
import json
import os
import re
import warnings

# owner/name: what --init or --unet may mean when no such path exists
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def offline():
    """HF_HUB_OFFLINE as the hub library reads it (1, ON, YES, TRUE), read now: the library itself
    reads it once, at its import. The one place this project decides whether the hub may be asked."""
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def offline_everywhere():
    """While offline() holds, the hub library's own switch on too, for code that is not ours (an
    optional package's hf_hub_download or from_pretrained calls): the library reads HF_HUB_OFFLINE
    once, at its import, so a variable set later would not stop it. Its requests check the switch
    when they are made, and refuse."""
    if not offline():
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub library: nothing of it can download
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def unreachable(repo, repo_type="dataset", timeout=4.0):
    """Why the hub cannot be reached about REPO (no network, no name resolution, no answer within
    TIMEOUT seconds), or None when it answers, whatever it answers (a missing or gated repo is the
    loader's to say) or when HF_HUB_OFFLINE is set (the loaders say that). One request, no retries:
    the libraries' own retries take half a minute to say the same."""
    if offline():
        return None
    try:
        from huggingface_hub import HfApi
    except ImportError:
        return None
    try:
        HfApi().repo_info(repo, repo_type=repo_type, timeout=timeout)
    except Exception as err:  # the HTTP client's own classes: ConnectError, ConnectTimeout, ...
        network = isinstance(err, (OSError, TimeoutError)) or any(
            word in type(err).__name__ for word in ("Connect", "Timeout", "Network", "Transport", "Proxy"))
        if network and not type(err).__name__.startswith(("Hf", "Repository", "Gated", "Revision")):
            return first_line(err)
    return None


def hub_kwargs():
    """from_pretrained's keyword arguments: the offline rule, and safetensors only (a repo or folder
    whose weights are pickles is refused by the library instead of unpickled)."""
    return dict(local_files_only=offline(), use_safetensors=True)


# Nothing is read with pickle, anywhere: unpickling runs whatever code the file names (torch's
# weights_only stops that code with a long traceback, not with an answer). A folder whose weights
# are pickles is refused in one line that says how to convert them once.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickle_problem(folder, flag, spec=None):
    """For a local model folder (diffusers' or transformers' layout; a pipeline's subfolders too):
    one error line when its weights are pickles with no .safetensors beside them, else None."""
    if not os.path.isdir(folder):
        return None
    for sub in ("", "unet", "vae", "text_encoder", "text_encoder_2"):
        where = os.path.join(folder, sub)
        try:
            names = sorted(os.listdir(where)) if os.path.isdir(where) else []
        except OSError:
            continue
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and os.path.isfile(os.path.join(where, n))]
        if pickles and not any(n.endswith(".safetensors") for n in names):
            src = os.path.join(where, pickles[0])
            dst = os.path.join(where, SAFE_NAMES.get(pickles[0], os.path.splitext(pickles[0])[0] + ".safetensors"))
            return (f"error: {flag} {spec or folder}: {src} is a pickle, which this project never reads (unpickling "
                    f"can run code); convert it once, where you trust its source: python -m tools.to_safetensors "
                    f"{src} {dst}")
    return None


def pickled_flags_problem(args, flags):
    """pickle_problem for each of FLAGS (e.g. "--init") whose value in ARGS is a local folder: the
    flag checks' early look, before anything loads (the loaders look again)."""
    for flag in flags:
        value = getattr(args, flag[2:], None)
        if isinstance(value, str) and os.path.isdir(value):
            problem = pickle_problem(value, flag)
            if problem:
                return problem
    return None


# A pickle's name -> the name its loader looks for in safetensors
SAFE_NAMES = {"diffusion_pytorch_model.bin": "diffusion_pytorch_model.safetensors", "pytorch_model.bin": "model.safetensors"}


# Real components, from the hub or a local diffusers folder
def _offline_exit(what, source, err):
    # One clear line instead of a traceback: the usual cause is a machine without hub access.
    raise SystemExit(f"error: cannot load the {what} from '{source}' ({first_line(err)}). Without hub access, download "
                     f"the model once and pass --pretrained /path/to/folder (a diffusers layout with unet/, vae/, "
                     f"text_encoder/, tokenizer/, scheduler/).")

def load_real(source, xl, encoders=True):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    problem = pickle_problem(source, "--pretrained")
    if problem:
        raise SystemExit(problem)
    kw = hub_kwargs()
    tok = dict(local_files_only=kw["local_files_only"])  # (a tokenizer or scheduler holds no weights)
    try:
        parts = dict(scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **tok),
                     unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw),
                     vae=None, text_encoders=[], tokenizers=[])
        if not encoders:
            return parts
        parts.update(tokenizers=[CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **tok)],
                     text_encoders=[CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)],
                     vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kw))
        if xl:
            parts["tokenizers"].append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **tok))
            parts["text_encoders"].append(
                CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kw))
    except (OSError, ValueError, EnvironmentError) as err:
        _offline_exit("model", source, err)
    return parts

# What a UNet must share with a preset's to take its place (latents, text states, SDXL's extras).
UNET_FIT = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
            "projection_class_embeddings_input_dim")

def fitting_unet(unet, preset_unet, what, model):
    """unet, after checking it can take preset_unet's place: a UNet of another preset would fail
    deep inside the first step, or worse, run."""
    for key in UNET_FIT:
        want, got = preset_unet.config.get(key), unet.config.get(key)
        if want != got:
            raise SystemExit(f"error: {what} does not fit --model {model}: its {key} is {got}, the preset's {want}; "
                             f"pass the --model it was trained with")
    return unet

def first_line(err):
    """An exception's first line, at most 200 characters: what a one-line error quotes."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]

def safetensors_problem(path):
    """Why a .safetensors file cannot be whole (missing, cut short, not safetensors), or None.
    The byte ranges its header declares must end exactly at the end of the file."""
    if not os.path.isfile(path):
        return "is missing"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                return f"is truncated or corrupt ({size} bytes, shorter than its header)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "is corrupt (its header is not a safetensors header)"
    if 8 + n + end != size:
        return f"is truncated or corrupt ({size} bytes where its header promises {8 + n + end})"
    return None

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def non_float_tensor(path):
    """(name, dtype) of the first tensor of a whole safetensors file that is not floating point
    (int32 weights would be cast to float without a word, and train as nonsense), else None."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return next(((k, v["dtype"]) for k, v in header.items() if k != "__metadata__" and v["dtype"] not in FLOAT_DTYPES),
                None)

@contextlib.contextmanager
def quiet():
    # Library deprecation notices on stderr would bury the one line a failure ends in, and so would
    # diffusers' own error log ("An error occurred while trying to fetch ...") before what it raises.
    from diffusers.utils import logging as diffusers_logging
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)

def load_unet(spec, flag="--init"):
    """The UNet of `flag` (train.py's --init, sample.py's --unet): a local unet/ folder (or its
    parent), or, when no such path exists, a hub id owner/name. Any problem ends in one line
    naming the flag."""
    from diffusers import UNet2DConditionModel
    if not os.path.exists(spec):
        if not HUB_ID.fullmatch(spec):
            raise SystemExit(f"error: {flag} {spec}: no such folder (nor a hub id of the form owner/name)")
        return _hub_unet(spec, flag)
    path = os.path.join(spec, "unet") if os.path.isdir(os.path.join(spec, "unet")) else spec
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: {flag} {spec}: no UNet there (expected a diffusers unet/ folder with config.json)")
    for name in sorted(os.listdir(path)):  # diffusers' own message for a cut file names no cause
        problem = safetensors_problem(os.path.join(path, name)) if name.endswith(".safetensors") else None
        if problem:
            raise SystemExit(f"error: {flag} {spec}: {os.path.join(path, name)} {problem}; copy or save it again")
        bad = non_float_tensor(os.path.join(path, name)) if name.endswith(".safetensors") else None
        if bad:
            raise SystemExit(f"error: {flag} {spec}: {os.path.join(path, name)} holds {bad[0]} as {bad[1]}, not "
                             f"floating-point weights")
    problem = pickle_problem(path, flag, spec)
    if problem:
        raise SystemExit(problem)
    try:
        with quiet():
            return UNet2DConditionModel.from_pretrained(path, use_safetensors=True)
    except Exception as err:  # a bad config.json, a .bin that is not a checkpoint, ...
        raise SystemExit(f"error: {flag} {spec}: cannot load the UNet in {path} "
                         f"({type(err).__name__}: {first_line(err)})")

def _hub_unet(repo, flag):
    """A hub repo's UNet: its unet/ subfolder (a pipeline repo such as mhdang/dpo-sd1.5-text2image-v1)
    or its root (a UNet-only repo), whichever holds config.json."""
    from diffusers import UNet2DConditionModel
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        from huggingface_hub.errors import RemoteEntryNotFoundError
    except ImportError:  # huggingface_hub < 1.0
        from huggingface_hub.errors import EntryNotFoundError as RemoteEntryNotFoundError
    is_offline = offline()
    reason = None
    for sub in ("unet", None):
        try:
            with quiet():
                hf_hub_download(repo, "config.json", subfolder=sub, local_files_only=is_offline)
        except RemoteEntryNotFoundError as err:  # the hub answered: not in this repo, try its root
            if not isinstance(err, LocalEntryNotFoundError):  # (< 1.0 derives the offline miss from it)
                continue
            if is_offline:
                reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
                continue
            reason = first_line(err)
            break
        except (OSError, ValueError) as err:  # offline and not cached, no network, no such repo
            if is_offline:  # the hub's own message would only say "check your connection"
                reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
                continue  # the cache may hold the root layout
            reason = first_line(err)
            break  # the other layout would only wait for the network again
        try:
            with quiet():
                return UNet2DConditionModel.from_pretrained(repo, subfolder=sub, local_files_only=is_offline,
                                                            use_safetensors=True)  # (never a pickle)
        except Exception as err:  # weights that fail to download or load
            reason = first_line(err)
            break
    if reason is None:
        raise SystemExit(f"error: {flag} {repo}: the hub repo has no unet/config.json nor config.json (not a "
                         f"diffusers UNet)")
    raise SystemExit(f"error: {flag} {repo}: not a local folder, and it could not be downloaded from the Hugging "
                     f"Face hub ({reason}); download it where there is network (hf download {repo}) "
                     f"and pass its folder")


def cannot_load(what, name, flag, err):
    return SystemExit(f"error: cannot load {what} '{name}' ({first_line(err)}); pass {flag} /path/to/a/local/copy")

def load_clip(name, flag, what, device, processor=None, processor_flag=None, tokenizer_only=False):
    """The one CLIP loader (E5's embedder, evaluate.py's reward models): a CLIPModel (hub id or
    local folder) and what prepares its inputs, by default from the same place: its processor, or
    with tokenizer_only its CLIPTokenizer -> (model in eval mode on `device`, processor)."""
    from transformers import AutoProcessor, CLIPModel, CLIPTokenizer
    problem = pickle_problem(name, flag)
    if problem:
        raise SystemExit(problem)
    try:
        model = CLIPModel.from_pretrained(name, **hub_kwargs())
    except (OSError, ValueError) as err:
        raise cannot_load(what, name, flag, err)
    try:
        proc = (CLIPTokenizer if tokenizer_only else AutoProcessor).from_pretrained(processor or name,
                                                                                   local_files_only=offline())
    except (OSError, ValueError) as err:
        raise cannot_load(f"the processor of {what}", processor or name, processor_flag or flag, err)
    return model.to(device).eval().requires_grad_(False), proc
