"""Push a folder (an adapter or a merged model) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from lora_cpt.errors import LoraCptError
from lora_cpt.util import first_line


def push_folder(folder: str | Path, repo_id: str, private: bool = True, message: str = "Upload with lora-cpt",
                log=print) -> str:
    """Create the model repo if needed and upload `folder`; returns the repo URL."""
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as e:  # network, auth and hub errors come in many types
        raise LoraCptError(f"--push-to-hub {repo_id}: upload failed: {first_line(e, 200)} (log in with `hf auth login` "
                           "or set HF_TOKEN)") from None
    log(f"pushed {folder} to https://huggingface.co/{repo_id}")
    return str(url)
