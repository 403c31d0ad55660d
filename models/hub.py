"""Where an export lives: a local directory, or a Hugging Face Hub repository id (`user/name`, optionally
`user/name@revision`) that huggingface_hub downloads into its own cache (and, with HF_HUB_OFFLINE=1, finds there
or reports missing). Nothing of the download is done here."""
import re
from pathlib import Path
from typing import Union

from models.checkpoint_io import CheckpointError

# The Hub's repository ids: an owner and a name of letters, digits, '-', '_' and '.'; a revision after '@'.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


def is_hub_id(source) -> bool:
    return isinstance(source, str) and HUB_ID.fullmatch(source) is not None


def resolve_export(source: Union[str, Path]) -> Path:
    """The local directory of an export: `source` itself when it exists (or is not a repository id), else the
    snapshot of the Hub repository it names."""
    path = Path(source)
    if path.exists() or not is_hub_id(source):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    match = HUB_ID.fullmatch(source)
    repo, revision = match["repo"], match["revision"]
    try:
        return Path(snapshot_download(repo, revision=revision))
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(f"{source}: no such directory, and the Hub repository {repo} is not in the "
                                  f"Hugging Face cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 forbids "
                                  f"downloading it; unset HF_HUB_OFFLINE once, or give an export directory") from e
        raise CheckpointError(f"{source}: no such directory, and the Hub repository {repo} could not be "
                              f"downloaded ({e})") from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(f"{source}: no such directory, nor a Hub repository this machine may read "
                              f"({e.__class__.__name__})") from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"{source}: the Hub repository {repo} has no revision {revision!r}") from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"{source}: downloading the Hub repository {repo} failed ({e})") from e
