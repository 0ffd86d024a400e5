"""Label Studio's REST API as this project uses it: the personal access token, an authenticated connection whose
faults are typed errors naming the server, the run's project (made once, recorded in the run folder), tasks
found by their data, a Local Files storage that is checked to serve, images uploaded, tasks added. It knows
nothing of a round's files: ``label_studio.py`` builds the round's push, progress and pull on it (``push_round``,
``round_progress``, ``pull_round``; its ``push`` / ``pull`` commands).

The run's project is recorded in ``annotate/label_studio_project.json`` with the server's address and the run
folder's identity (absolute path and inode): a ``cp -r`` copy of the run folder (another inode) or another server
gets a project of its own at its next push, logged, so a copy never writes into the original's project. A project
made by a push killed before it was recorded is found again by its description (the run id and folder). The token
is recorded nowhere.

The calls, and what makes them: Label Studio's SDK (``label_studio_sdk.LabelStudio``, 2.1) where it has the call;
plain HTTP, through the SDK's own authenticated client (so the same token refresh), where it has not:

    whose token                      SDK users.whoami                    GET  /api/current-user/whoami
    the run's project                SDK projects.create / get / list    /api/projects/
    a Local Files storage            SDK import_storage.local.list / validate / create / delete
                                                                         /api/storages/localfiles/
    tasks added                      SDK projects.import_tasks           POST /api/projects/{id}/import (JSON)
    tasks found by their data        SDK tasks.list (a Data Manager filter)   GET /api/tasks/
    an image uploaded                plain HTTP (the SDK's import takes JSON only)
                                                         POST /api/projects/{id}/import?commit_to_project=false
    an uploaded image's address      SDK files.list                      GET  /api/projects/{id}/file-uploads
    an image served from a storage   plain HTTP (a file, not an API call)  GET /data/local-files/?d=...

A personal access token (Label Studio 1.23: a JWT refresh token) is exchanged by the SDK for access tokens that
live 5 minutes, and again once one has expired (tests/test_label_studio_api.py checks it against 1.23.2).
Faults (``ApiError`` and its kinds) are raised before anything is written: a token missing, readable by others,
expired, revoked or of another server (``TokenError``); a server that does not answer (``ServerUnreachableError``)
or refuses a call (``ServerRefusedError``); the project or tasks deleted by hand (``ProjectGoneError``,
``TaskGoneError``); tasks not yet answered (``RoundNotDoneError``).
"""
from __future__ import annotations

import json
import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from datasets_skin import PathLike
from safe_io import atomic_write_text

log = logging.getLogger("trainer.label_studio")  # label_studio's logger: under the trainer's, into its log.txt

DEFAULT_URL = "http://127.0.0.1:8080"
TOKEN_VARIABLE = "LABEL_STUDIO_API_KEY"  # the SDK's own variable
PROJECT_FILE = "label_studio_project.json"  # in the run's annotate/ folder: the run's project, its server, the folder
LOCAL_FILES, UPLOAD = "local_files", "upload"  # how a round's images reach the server
TOKEN_PAGE = "Account & Settings -> Personal Access Token"  # where Label Studio 1.23 makes one (top-right menu)
TITLE_LENGTH = 50  # Label Studio's longest project title


class ApiError(ValueError):
    """A call to Label Studio that cannot be done; the message names the server's address and what to do."""


class TokenError(ApiError):
    """No token, a token file others can read, or a token the server refuses (expired, revoked, of another
    server)."""


class ServerUnreachableError(ApiError):
    """The server does not answer (not started, restarting, another address)."""


class ServerRefusedError(ApiError):
    """The server answered a call with an error (not about the token)."""


class ProjectGoneError(ApiError):
    """The run's project is not on the server (deleted by hand?), or not on this server; or its record in the
    run folder is unreadable."""


class TaskGoneError(ApiError):
    """Images of a round have no task in the project (deleted by hand?)."""


class RoundNotDoneError(ApiError):
    """Tasks of a round are neither annotated nor skipped; ``waiting``: (image, task's address) of each."""

    def __init__(self, message: str, waiting: List[Tuple[str, str]]) -> None:
        super().__init__(message)
        self.waiting = waiting


# ----------------------------------------------------------------------------- the token

class Token:
    """A personal access token that does not print itself (``str``/``repr`` name where it came from)."""

    def __init__(self, value: str, source: str) -> None:
        self._value, self.source = value, source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"<Label Studio token from {self.source}>"

    __str__ = __repr__


def read_token(token_file: Optional[PathLike] = None, environ: Mapping[str, str] = os.environ) -> Token:
    """The personal access token: read from ``token_file`` when one is given (refused when its group or others
    have any permission on it: chmod 600), else from $LABEL_STUDIO_API_KEY. Raises ``TokenError``."""
    make_one = f"create one in Label Studio ({TOKEN_PAGE})"
    if token_file is None:
        value = environ.get(TOKEN_VARIABLE, "").strip()
        if not value:
            raise TokenError(f"no Label Studio token: {make_one}, then export {TOKEN_VARIABLE}=<it>, or save it in "
                             "a file only you can read and give that file")
        return Token(value, f"${TOKEN_VARIABLE}")
    path = Path(token_file)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenError(f"{path}: others may use it (mode {stat.filemode(mode)}): a token file must be "
                             f"yours alone: chmod 600 {path}")
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise TokenError(f"{path}: cannot read the token file ({type(err).__name__}); {make_one} and save it "
                         "there") from None
    if not value or len(value.split()) != 1:
        raise TokenError(f"{path}: not a token (expected one line holding it); {make_one} and save it there")
    return Token(value, str(path))


# ----------------------------------------------------------------------------- the connection

def normal_url(url: str) -> str:
    """``url`` without a trailing slash, after checking it is an http(s) address with a host."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServerUnreachableError(f"{url!r} is not the address of a Label Studio server (expected like "
                                     f"{DEFAULT_URL})")
    return url.strip().rstrip("/")


class Client:
    """An authenticated connection to one Label Studio server: ``sdk`` (its SDK client), ``url``, ``user`` (the
    token's owner: dict with id and email). Every call goes through ``calling``, which turns the SDK's and the
    network's exceptions into this module's errors, each naming the server."""

    def __init__(self, url: str, token: Token, timeout_s: float = 120) -> None:
        from label_studio_sdk import LabelStudio  # pylint: disable=import-outside-toplevel

        self.url, self.token = normal_url(url), token
        # no retries inside the SDK: a request it repeats after an error may have been done once already (an
        # import twice); a caller repeats a whole push or pull instead, which finds what was done
        with self.calling("the token check"):
            self.sdk = LabelStudio(base_url=self.url, api_key=token.reveal(), timeout=timeout_s, max_retries=0)
            me = self.sdk.users.whoami()
        self.user = dict(id=me.id, email=me.email)

    def scrub(self, text: str) -> str:
        return str(text).replace(self.token.reveal(), "<token>")

    @contextmanager
    def calling(self, what: str, gone: Optional[str] = None) -> Iterator[None]:
        """Run SDK or HTTP calls doing ``what``; their failures become ``TokenError`` (401),
        ``ProjectGoneError`` with the message ``gone`` (404, when given), ``ServerUnreachableError`` (no
        answer) or ``ServerRefusedError``."""
        import httpx  # pylint: disable=import-outside-toplevel
        from label_studio_sdk.core.api_error import ApiError as SdkError  # pylint: disable=import-outside-toplevel

        try:
            yield
        except SdkError as err:
            detail = self.scrub(error_detail(err.body))
            if err.status_code == 401:
                raise TokenError(f"{self.url} refused the token from {self.token.source} ({detail}): it is expired, "
                                 f"revoked or of another server; create a new one ({TOKEN_PAGE})") from None
            if err.status_code == 404 and gone:
                raise ProjectGoneError(gone) from None
            raise ServerRefusedError(f"{self.url}: {what} failed: {err.status_code} {detail}") from None
        except httpx.TransportError as err:
            raise ServerUnreachableError(f"{self.url} does not answer ({what}: {type(err).__name__}: "
                                         f"{self.scrub(err)}); is Label Studio running there?") from None
        except ValueError as err:  # an answer that is not JSON (a proxy's error page)
            raise ServerRefusedError(f"{self.url}: {what}: an answer that is not Label Studio's "
                                     f"({self.scrub(err)})") from None

    def http(self, method: str, path: str, check: bool = True, **kwargs):
        """A plain HTTP request to ``path`` of the server, authenticated as the SDK's own requests are; an error
        answer raises the SDK's ApiError (for ``calling``) unless not ``check``."""
        # the SDK's HTTP client: its base address, headers and token refresh (SDK 2.x; pinned below 3)
        response = self.sdk._client_wrapper.httpx_client.request(path, method=method, **kwargs)  # noqa: SLF001
        if check and response.status_code >= 400:
            from label_studio_sdk.core.api_error import ApiError as SdkError  # pylint: disable=import-outside-toplevel

            try:
                body = response.json()
            except ValueError:
                body = response.text[:300]
            raise SdkError(status_code=response.status_code, body=body)
        return response

    def project_url(self, project_id: int) -> str:
        return f"{self.url}/projects/{project_id}"

    def task_url(self, project_id: int, task_id: object) -> str:
        return f"{self.url}/projects/{project_id}/data?task={task_id}"


def error_detail(body: object) -> str:
    """The readable part of an error answer of Label Studio (its ``detail`` and validation errors)."""
    if isinstance(body, dict):
        parts = [str(body.get("detail", ""))] + [f"{key}: {value}" for key, value in
                                                  (body.get("validation_errors") or {}).items()]
        return "; ".join(p for p in parts if p) or json.dumps(body)[:300]
    return str(body)[:300]


def connect(url: str, token: Token) -> Client:
    """A ``Client`` of the server at ``url``, the token checked (``TokenError``, ``ServerUnreachableError``)."""
    return Client(url, token)


# ----------------------------------------------------------------------------- the run's project

def folder_identity(run_dir: Path) -> Dict[str, object]:
    """What tells this run folder from a copy of it: its absolute path and its inode (a ``cp -r`` copy has
    another inode, even at the same path on another disk)."""
    return dict(run_folder=os.path.abspath(run_dir), inode=os.stat(run_dir).st_ino)


def read_project_record(run_dir: Path) -> Optional[dict]:
    """The run's recorded project (``PROJECT_FILE``), or None when there is none."""
    path = run_dir / "annotate" / PROJECT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        int(record["project"]), str(record["url"]), record["run_folder"], int(record["inode"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ProjectGoneError(f"{path}: not a record of the run's Label Studio project ({type(err).__name__}: "
                               f"{err}); delete it to make a new project at the next push") from None
    return record


def project_title(run_dir: Path) -> str:
    """The project's title, from the run folder: OUTPUT/Skin_S (its last Label Studio's title-length characters)."""
    title = f"{run_dir.parent.name}/{run_dir.name}"
    return title if len(title) <= TITLE_LENGTH else "..." + title[-(TITLE_LENGTH - 3):]


def project_description(run_id: str, run_dir: Path) -> str:
    return f"MD-SAM-AL run {run_id} in {os.path.abspath(run_dir)}"


def recorded_project(client: Client, run_dir: Path) -> Optional[int]:
    """The id of the run's project on this server when the record is this run folder's, this server's, and the
    project is there; None (with the reason logged) when a new project is due; ``ProjectGoneError`` when the
    recorded project of this very run folder was deleted."""
    record = read_project_record(run_dir)
    if record is None:
        return None
    here = folder_identity(run_dir)
    if (record["run_folder"], int(record["inode"])) != (here["run_folder"], here["inode"]):
        log.info("%s is a copy of the run folder %s (its project: %s): this copy gets a Label Studio project of "
                 "its own", run_dir, record["run_folder"], client.project_url(record["project"]))
        return None
    if normal_url(record["url"]) != client.url:
        log.info("the run's Label Studio project is on %s, this server is %s: making a project here",
                 record["url"], client.url)
        return None
    project_id = int(record["project"])
    check_project(client, project_id, run_dir)
    return project_id


def check_project(client: Client, project_id: int, run_dir: Path) -> None:
    """``ProjectGoneError`` when the project is not on the server."""
    record = run_dir / "annotate" / PROJECT_FILE
    with client.calling(f"reading project {project_id}",
                        gone=f"{client.project_url(project_id)}: the run's project ({record}) is not on the server "
                             "(deleted by hand?); its tasks and annotations went with it. Delete the record to "
                             "make a new project and push the round again"):
        client.sdk.projects.get(id=project_id)


def ensure_project(client: Client, run_dir: Path, run_id: str, interface: str) -> int:
    """The run's project on this server: the recorded one (``recorded_project``), else one a killed push made
    before recording it (found by its description), else a new one (title: the run folder; the round's
    ``interface``; the run's ``model_version``). Recorded in ``annotate/label_studio_project.json``; logged."""
    project_id = recorded_project(client, run_dir)
    if project_id is not None:
        return project_id
    description = project_description(run_id, run_dir)
    with client.calling("listing the projects"):
        found = [p.id for p in client.sdk.projects.list() if p.description == description]
    if found:
        project_id = found[0]
        log.info("Label Studio project %s (made for this run, not yet recorded) is the run's project",
                 client.project_url(project_id))
    else:
        with client.calling("creating the run's project"):
            project_id = client.sdk.projects.create(title=project_title(run_dir), description=description,
                                                    label_config=interface, model_version=run_id).id
        log.info("Label Studio project %s made for the run %s", client.project_url(project_id), run_dir)
    atomic_write_text(run_dir / "annotate" / PROJECT_FILE,
                      json.dumps(dict(url=client.url, project=project_id, run_id=run_id,
                                      **folder_identity(run_dir)), indent=1) + "\n")
    return project_id


# ----------------------------------------------------------------------------- tasks and images

def data_filter(data: Mapping[str, object]) -> str:
    """A Data Manager query for the tasks whose data has each of these values (text or number)."""
    items = [dict(filter=f"filter:tasks:data.{key}", operator="equal",
                  type="Number" if isinstance(value, (int, float)) else "String", value=value)
             for key, value in data.items()]
    return json.dumps(dict(filters=dict(conjunction="and", items=items)))


def find_tasks(client: Client, project_id: int, data: Mapping[str, object], fields: str = "all") -> List[dict]:
    """The project's tasks whose data holds ``data`` (with their annotations and predictions unless ``fields`` is
    "task_only"), filtered by the server and checked again here."""
    with client.calling("listing tasks", gone=f"{client.project_url(project_id)}: the run's project is not on the "
                                              "server (deleted by hand?)"):
        tasks = [t.model_dump() for t in client.sdk.tasks.list(project=project_id, fields=fields,
                                                                  query=data_filter(data))]
    return [t for t in tasks if all(t["data"].get(key) == value for key, value in data.items())]


def add_tasks(client: Client, project_id: int, tasks: List[dict], what: str) -> None:
    """Import ``tasks`` (Label Studio's JSON: data and predictions) into the project, in one request."""
    with client.calling(f"adding {what}"):
        client.sdk.projects.import_tasks(id=project_id, request=tasks)


def local_files_storage(client: Client, project_id: int, folder: Path, probe_url: str) -> Tuple[bool, str]:
    """A Local Files storage of the project on ``folder`` when the server serves its files through it: (True,
    how) once the file of ``probe_url`` (an address under the storage, of a file in ``folder``) came back byte for
    byte; else (False, why), and no storage made here is left."""
    path = os.path.abspath(folder)
    with client.calling("listing the project's Local Files storages"):
        existing = [s.id for s in client.sdk.import_storage.local.list(project=project_id) if s.path == path]
    made = None
    if not existing:
        try:
            with client.calling("checking a Local Files storage"):
                client.sdk.import_storage.local.validate(project=project_id, path=path, title=folder.name)
        except ServerRefusedError as err:
            return False, f"the server cannot read {path} as Local Files ({err})"
        with client.calling("making a Local Files storage"):
            made = client.sdk.import_storage.local.create(project=project_id, path=path, title=folder.name,
                                                          use_blob_urls=True).id
    probe = folder / os.path.basename(parse_qs(urlsplit(probe_url).query).get("d", [""])[0])
    with client.calling("fetching a file through the storage"):
        served = client.http("GET", probe_url.lstrip("/"), check=False)
    if served.status_code == 200 and probe.is_file() and served.content == probe.read_bytes():
        return True, f"a Local Files storage on {path}" + ("" if made is None else f", storage {made} made")
    if made is not None:
        with client.calling("removing the storage that does not serve"):
            client.sdk.import_storage.local.delete(id=made)
    return False, f"the server did not serve {probe_url} from {path} (answer {served.status_code})"


def upload_files(client: Client, project_id: int, files: List[Path]) -> Dict[str, str]:
    """Upload ``files`` into the project (files only, no tasks); file name -> its address on the server."""
    addresses = {}
    for path in files:
        with open(path, "rb") as image, client.calling(f"uploading {path.name}"):
            answer = client.http("POST", f"api/projects/{project_id}/import", params=dict(commit_to_project="false"),
                                 files=dict(file=(path.name, image)))
            (upload_id,) = answer.json()["file_upload_ids"]
            (upload,) = client.sdk.files.list(id=project_id, ids=json.dumps([upload_id]))
        addresses[path.name] = "/data/" + upload.file
    return addresses
