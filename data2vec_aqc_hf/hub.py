"""Pushing folders to the Hugging Face Hub (the one network boundary of the package)."""

from __future__ import annotations

from huggingface_hub import HfApi


def push_folder(folder, repo_id: str, commit_message: str, private: bool | None = None, token: str | None = None,
                path_in_repo: str | None = None, api: HfApi | None = None,
                ignore_patterns: list[str] | None = None) -> str:
    """Create the model repo if needed and upload `folder` (less files matching `ignore_patterns`); returns the
    commit URL."""
    api = api or HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message, path_in_repo=path_in_repo,
                             ignore_patterns=ignore_patterns)
    return str(getattr(info, "commit_url", info))
