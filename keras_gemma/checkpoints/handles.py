"""Handles -> local directories: kaggle://owner/model/framework/variation[/version], hf://org/repo.

Downloads go only through kagglehub and huggingface_hub (imported lazily), into their caches
and with their progress bars. Every failure becomes one error that says what to do.
"""

import os

KAGGLE_PREFIX = "kaggle://"
HF_PREFIX = "hf://"

# Only what a Gemma checkpoint needs: never pickled weights.
HF_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

WHAT_TO_DO = (
    "To fix it: accept the Gemma license on the model's Kaggle or Hugging Face page, then "
    "set KAGGLE_USERNAME and KAGGLE_KEY (Kaggle) or HF_TOKEN (Hugging Face), check that "
    "this machine can reach the hub, or pass a local directory or .gguf file instead."
)


class PresetDownloadError(RuntimeError):
    """A preset could not be fetched from Kaggle or Hugging Face."""


def is_remote_handle(handle):
    return isinstance(handle, str) and handle.startswith((KAGGLE_PREFIX, HF_PREFIX))


def _describe(error):
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) < 400 else text[:400] + " ..."


def check_handle_path(handle, prefix, path):
    """Refuses a handle whose path could leave the hub's cache: `..` or `.` segments, an
    absolute path, a home (`~`) or drive path, backslashes or control characters.

    Example:
    >>> check_handle_path("hf://../../etc", "hf://", "../../etc")
    Traceback (most recent call last):
    ValueError: 'hf://../../etc' is not a valid handle: ...
    """
    segments = path.split("/")
    problem = None
    if path.startswith(("/", "~")) or (len(path) > 1 and path[1] == ":"):
        problem = "it holds an absolute path"
    elif "\\" in path or any(ord(c) < 32 for c in path):
        problem = "it holds a backslash or a control character"
    elif any(segment in ("..", ".") for segment in segments):
        problem = "it holds a '..' or '.' path segment"
    if problem:
        example = ("kaggle://keras/gemma/keras/gemma_2b_en/3" if prefix == KAGGLE_PREFIX
                   else "hf://google/gemma-2b")
        raise ValueError(
            f"{handle!r} is not a valid handle: {problem}, which could point outside the "
            f"download cache. Write it as {prefix}... with plain names, e.g. {example}; for "
            "files on this machine pass the local directory itself."
        )


def download_kaggle(handle):
    """Downloads `kaggle://owner/model/framework/variation[/version]`; returns its directory."""
    path = handle[len(KAGGLE_PREFIX):]
    check_handle_path(handle, KAGGLE_PREFIX, path)
    path = path.strip("/")
    parts = path.split("/")
    if len(parts) not in (4, 5) or not all(parts):
        raise ValueError(
            f"{handle!r} is not a Kaggle model handle: expected "
            "kaggle://owner/model/framework/variation[/version], e.g. "
            "kaggle://keras/gemma/keras/gemma_2b_en/3."
        )
    try:
        import kagglehub
    except ImportError:
        raise PresetDownloadError(
            f"downloading {handle} needs kagglehub: pip install 'keras-gemma[hub]'."
        ) from None
    try:
        return kagglehub.model_download(path)
    except Exception as error:  # kagglehub raises many kinds; all mean "not downloaded"
        raise PresetDownloadError(
            f"could not download {handle} from Kaggle ({_describe(error)}). {WHAT_TO_DO}"
        ) from error


def download_huggingface(handle):
    """Downloads the safetensors checkpoint `hf://org/repo[@revision]`; returns its directory."""
    repo = handle[len(HF_PREFIX):]
    check_handle_path(handle, HF_PREFIX, repo)
    repo = repo.strip("/")
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    if repo.count("/") != 1:
        raise ValueError(f"{handle!r} is not a Hugging Face handle: expected hf://org/repo.")
    try:
        import huggingface_hub
    except ImportError:
        raise PresetDownloadError(
            f"downloading {handle} needs huggingface_hub: pip install 'keras-gemma[hub]'."
        ) from None
    try:
        return huggingface_hub.snapshot_download(
            repo_id=repo, revision=revision, allow_patterns=HF_PATTERNS
        )
    except Exception as error:
        raise PresetDownloadError(
            f"could not download {handle} from Hugging Face ({_describe(error)}). {WHAT_TO_DO}"
        ) from error


def download(handle):
    if handle.startswith(KAGGLE_PREFIX):
        return download_kaggle(handle)
    return download_huggingface(handle)


def download_card_sources(card):
    """Tries a preset card's sources in order (Kaggle, then Hugging Face)."""
    failures = []
    for source in ("kaggle", "huggingface"):
        handle = card.get("sources", {}).get(source)
        if not handle:
            continue
        try:
            return download(handle)
        except PresetDownloadError as error:
            failures.append(str(error).split(" To fix it:")[0])
    raise PresetDownloadError(
        f"could not fetch preset {card['name']!r}: " + " | ".join(failures) + " " + WHAT_TO_DO
    )


def local_path(handle):
    """`handle` as an existing local path, or None."""
    if isinstance(handle, os.PathLike):
        handle = os.fspath(handle)
    if isinstance(handle, str):
        expanded = os.path.expanduser(handle)
        if os.path.exists(expanded):
            return expanded
        if handle and not handle.startswith((KAGGLE_PREFIX, HF_PREFIX)):
            from keras_gemma.atomic_write import recover_interrupted_write

            # A save killed between its two renames left the earlier preset aside: put it
            # back (with a one-line notice) rather than report nothing there.
            if recover_interrupted_write(expanded):
                return expanded if os.path.exists(expanded) else None
    return None
