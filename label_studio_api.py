"""Label Studio through its REST API: the run's project, a round's tasks pushed, its progress, its annotations
pulled back into masks, with no file a person downloads, uploads or types the path of. ``label_studio.py push`` /
``pull`` call it; so will ``--oracle label_studio``.

What a caller does (a round folder written as ``label_studio.write_round_files`` writes it, in a run folder
``OUTPUT/Skin_S/annotate/round_NNN``):

    client = connect(url, read_token(token_file))    # the token checked against the server once
    pushed = push_round(client, round_dir)           # the run's project (made or found), the round's tasks added
    round_progress(client, round_dir).line()         # "round 3: 2 of 4 annotated, 1 skipped"
    result = pull_round(client, round_dir)           # masks into the round folder, as label_studio.py import

Every call of a round is safe to repeat: a push finds the round's tasks already in the project by their
``mdsam_run``/``mdsam_round``/``mdsam_image`` and adds only those missing (never a duplicate), and a pull writes
through ``label_studio.write_returned``, which never overwrites a mask and leaves one identical to the server's.

The run's project is recorded in ``annotate/label_studio_project.json`` with the server's address and the run
folder's identity (absolute path and inode): a ``cp -r`` copy of the run folder (another inode) or another server
gets a project of its own at its next push, logged, so a copy never writes into the original's project. The
token is not recorded anywhere.

The calls, and what makes them: Label Studio's SDK (``label_studio_sdk.LabelStudio``, 2.1) where it has the call;
plain HTTP, through the SDK's own authenticated client (so the same token refresh), where it has not:

    whose token                      SDK users.whoami                    GET  /api/current-user/whoami
    the run's project                SDK projects.create / get / list    /api/projects/
    a Local Files storage            SDK import_storage.local.list / validate / create / delete
                                                                         /api/storages/localfiles/
    a round's tasks added            SDK projects.import_tasks           POST /api/projects/{id}/import (JSON)
    a round's tasks found            SDK tasks.list (Data Manager filters on data.mdsam_*)   GET /api/tasks/
    an image uploaded                plain HTTP (the SDK's import takes JSON only)
                                                         POST /api/projects/{id}/import?commit_to_project=false
    an uploaded image's address      SDK files.list                      GET  /api/projects/{id}/file-uploads
    an image served from the storage plain HTTP (a file, not an API call)  GET /data/local-files/?d=...

A personal access token (Label Studio 1.23: a JWT refresh token) is exchanged by the SDK for access tokens that
live 5 minutes, renewed before each call once expired (tests/test_label_studio_api.py checks it against 1.23.2).

Faults are typed errors (``ApiError`` and its kinds), each naming the server's address and the project or task,
raised before anything is written: a token missing, readable by others, expired, revoked or of another server
(``TokenError``); a server that does not answer (``ServerUnreachableError``); the project or a task deleted by
hand (``ProjectGoneError``, ``TaskGoneError``); a round's tasks not all answered (``RoundNotDoneError``).
"""
from __future__ import annotations

import json
import logging
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

import label_studio
from datasets_skin import PathLike
from safe_io import atomic_write_text

log = logging.getLogger("trainer.label_studio")  # under the trainer's logger: a run's lines go to its log.txt

DEFAULT_URL = "http://127.0.0.1:8080"
TOKEN_VARIABLE = "LABEL_STUDIO_API_KEY"  # the SDK's own variable
PROJECT_FILE = "label_studio_project.json"  # in the run's annotate/ folder: the run's project, its server, the folder
LOCAL_FILES, UPLOAD = "local_files", "upload"  # how a round's images reach the server
TOKEN_PAGE = "Account & Settings -> Personal Access Token"  # where Label Studio 1.23 makes one (top-right menu)
TITLE_LENGTH = 50  # Label Studio's longest project title


class ApiError(label_studio.LabelStudioError):
    """A call to Label Studio that cannot be done; the message names the server's address and what to do."""


class TokenError(ApiError):
    """No token, a token file others can read, or a token the server refuses (expired, revoked, of another
    server)."""


class ServerUnreachableError(ApiError):
    """The server does not answer (not started, restarting, another address)."""


class ServerRefusedError(ApiError):
    """The server answered a call with an error (not about the token)."""


class ProjectGoneError(ApiError):
    """The run's project is not on the server (deleted by hand?), or the round was never pushed to this server."""


class TaskGoneError(ApiError):
    """Images of the round have no task in the project (deleted by hand?)."""


class RoundNotDoneError(ApiError):
    """Tasks of the round are neither annotated nor skipped; ``waiting``: (image, task's address) of each."""

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

def run_folder_of(round_dir: Path) -> Path:
    """The run folder of a round folder (RUN/annotate/round_NNN)."""
    return Path(os.path.abspath(round_dir)).parent.parent


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
        raise label_studio.RoundFolderError(f"{path}: not a record of the run's Label Studio project "
                                            f"({type(err).__name__}: {err}); delete it to make a new project at "
                                            "the next push") from None
    return record


def project_title(run_dir: Path) -> str:
    """The project's title, from the run folder: OUTPUT/Skin_S (its last Label Studio's title-length characters)."""
    title = f"{run_dir.parent.name}/{run_dir.name}"
    return title if len(title) <= TITLE_LENGTH else "..." + title[-(TITLE_LENGTH - 3):]


def project_description(run_id: str, run_dir: Path) -> str:
    return f"MD-SAM-AL run {run_id} in {os.path.abspath(run_dir)}"


def recorded_project(client: Client, run_dir: Path, run_id: str) -> Optional[int]:
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
    project_id = recorded_project(client, run_dir, run_id)
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


# ----------------------------------------------------------------------------- a round's tasks

def round_filter(run_id: str, round_number: int) -> str:
    """A Data Manager query for the tasks of one round of one run (their data's mdsam_run and mdsam_round)."""
    items = [dict(filter=f"filter:tasks:data.{label_studio.RUN_KEY}", operator="equal", type="String",
                  value=run_id),
             dict(filter=f"filter:tasks:data.{label_studio.ROUND_KEY}", operator="equal", type="Number",
                  value=round_number)]
    return json.dumps(dict(filters=dict(conjunction="and", items=items)))


def round_tasks(client: Client, project_id: int, run_id: str, round_number: int, fields: str = "all") -> List[dict]:
    """The project's tasks of the round (with their annotations unless ``fields`` is "task_only"), checked on
    their data here as well as filtered by the server."""
    with client.calling(f"listing the tasks of round {round_number}",
                        gone=f"{client.project_url(project_id)}: the run's project is not on the server "
                             "(deleted by hand?)"):
        tasks = [t.model_dump() for t in client.sdk.tasks.list(project=project_id, fields=fields,
                                                                  query=round_filter(run_id, round_number))]
    return [t for t in tasks if t["data"].get(label_studio.RUN_KEY) == run_id
            and t["data"].get(label_studio.ROUND_KEY) == round_number]


def tasks_by_image(tasks: List[dict]) -> Dict[str, List[int]]:
    """image name -> the ids of its tasks."""
    found: Dict[str, List[int]] = {}
    for task in tasks:
        found.setdefault(task["data"][label_studio.NAME_KEY], []).append(task["id"])
    return found


def local_files_root(round_dir: Path, tasks: List[dict]) -> Optional[Path]:
    """The document root the tasks file's image addresses were written for (None when they are not Local Files
    addresses of this round folder's images)."""
    prefix = label_studio.LOCAL_FILES_URL
    roots = set()
    for task in tasks:
        url = str(task["data"].get(label_studio.IMAGE_TAG, ""))
        relative = parse_qs(urlsplit(url).query).get("d", [""])[0] if url.startswith(prefix) else ""
        image = Path(os.path.abspath(round_dir / task["data"][label_studio.NAME_KEY]))
        if not relative or not image.as_posix().endswith("/" + relative):
            return None
        roots.add(image.as_posix()[:-len(relative) - 1] or "/")
    return Path(roots.pop()) if len(roots) == 1 else None


def local_files_storage(client: Client, project_id: int, round_dir: Path, tasks: List[dict]) -> Tuple[bool, str]:
    """A Local Files storage of the project on the round folder, when the server can serve the round's images
    through it: (True, how) after it served one of them byte for byte; else (False, why), nothing left made."""
    root = local_files_root(round_dir, tasks)
    if root is None:
        return False, f"the round's {label_studio.TASKS_FILE} holds no Local Files addresses of its images"
    path = os.path.abspath(round_dir)
    with client.calling("listing the project's Local Files storages"):
        existing = [s.id for s in client.sdk.import_storage.local.list(project=project_id) if s.path == path]
    made = None
    if not existing:
        try:
            with client.calling("checking a Local Files storage"):
                client.sdk.import_storage.local.validate(project=project_id, path=path, title=round_dir.name)
        except ServerRefusedError as err:
            return False, f"the server cannot read {path} as Local Files ({err})"
        with client.calling("making a Local Files storage"):
            made = client.sdk.import_storage.local.create(project=project_id, path=path, title=round_dir.name,
                                                          use_blob_urls=True).id
    first = tasks[0]["data"]
    with client.calling("fetching an image through the storage"):
        served = client.http("GET", first[label_studio.IMAGE_TAG].lstrip("/"), check=False)
    if served.status_code == 200 and served.content == (round_dir / first[label_studio.NAME_KEY]).read_bytes():
        how = f"a Local Files storage on {path} (document root {root})"
        return True, how if made is None else how + f", storage {made} made"
    if made is not None:
        with client.calling("removing the storage that does not serve the round"):
            client.sdk.import_storage.local.delete(id=made)
    return False, (f"the server did not serve {first[label_studio.IMAGE_TAG]} from {path} (answer "
                   f"{served.status_code}): its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT is not {root}, or it runs "
                   "on another machine")


def upload_images(client: Client, project_id: int, round_dir: Path, names: List[str]) -> Dict[str, str]:
    """Upload the round's images ``names`` into the project (files only, no tasks); image name -> its address."""
    addresses = {}
    for name in names:
        with open(round_dir / name, "rb") as image, client.calling(f"uploading {name}"):
            answer = client.http("POST", f"api/projects/{project_id}/import", params=dict(commit_to_project="false"),
                                 files=dict(file=(name, image)))
        (upload_id,) = answer.json()["file_upload_ids"]
        with client.calling(f"reading the address of the uploaded {name}"):
            (upload,) = client.sdk.files.list(id=project_id, ids=json.dumps([upload_id]))
        addresses[name] = "/data/" + upload.file
    return addresses


@dataclass
class PushedRound:
    """A round pushed: the project's id and address, the tasks made now and those found there already (image ->
    task ids), how its images reach the server (LOCAL_FILES or UPLOAD) and why."""

    project_id: int
    project_url: str
    created: Dict[str, List[int]]
    existing: Dict[str, List[int]]
    images_from: str
    why: str
    notes: List[str] = field(default_factory=list)


def push_round(client: Client, round_dir: PathLike) -> PushedRound:
    """Add the round's tasks to the run's project (``ensure_project``): each image's task from the round's
    tasks file (``label_studio.write_round_files``; written here first for a round without one), the model's
    proposal as its prediction, the image through a Local Files storage on the round folder when the server can
    serve it from there, else uploaded. Tasks already in the project (the same run, round and image) are kept and
    not made again. Logged."""
    round_dir = Path(round_dir)
    if not (round_dir / label_studio.TASKS_FILE).is_file():
        label_studio.write_folder_round_files(round_dir)
    expected = label_studio.target_round(round_dir)
    tasks = json.loads((round_dir / label_studio.TASKS_FILE).read_text())
    run_dir = run_folder_of(round_dir)
    interface = (round_dir / label_studio.INTERFACE_FILE).read_text()
    project_id = ensure_project(client, run_dir, expected.run_id, interface)
    existing = tasks_by_image(round_tasks(client, project_id, expected.run_id, expected.round_number, "task_only"))
    notes = [f"{name} has {len(ids)} tasks in the project (ids {', '.join(map(str, ids))}): annotate one, delete "
             "the others" for name, ids in existing.items() if len(ids) > 1]
    missing = [t for t in tasks if t["data"][label_studio.NAME_KEY] not in existing]
    where = f"round {expected.round_number}"
    if not missing:
        log.info("%s: its %d tasks are in %s already; nothing added", where, len(tasks), client.project_url(project_id))
        return PushedRound(project_id, client.project_url(project_id), {}, existing, "", "nothing to add", notes)
    served, why = local_files_storage(client, project_id, round_dir, missing)
    if served:
        images_from = LOCAL_FILES
    else:
        images_from = UPLOAD
        addresses = upload_images(client, project_id, round_dir, [t["data"][label_studio.NAME_KEY] for t in missing])
        missing = [dict(t, data={**t["data"], label_studio.IMAGE_TAG: addresses[t["data"][label_studio.NAME_KEY]]})
                   for t in missing]
        why = f"uploaded through the import API: {why}"
    with client.calling(f"adding the tasks of {where}"):
        client.sdk.projects.import_tasks(id=project_id, request=missing)
    now = tasks_by_image(round_tasks(client, project_id, expected.run_id, expected.round_number, "task_only"))
    created = {name: [i for i in ids if i not in existing.get(name, [])] for name, ids in now.items()}
    created = {name: ids for name, ids in created.items() if ids}
    log.info("%s: %d task(s) added to %s%s; images: %s", where, sum(map(len, created.values())),
             client.project_url(project_id), f" ({len(existing)} there already)" if existing else "", why)
    for note in notes:
        log.warning("%s: %s", where, note)
    return PushedRound(project_id, client.project_url(project_id), created, existing, images_from, why, notes)


# ----------------------------------------------------------------------------- a round's progress and its masks

@dataclass(frozen=True)
class RoundProgress:
    """Where a round stands in Label Studio: its images annotated, skipped, left to do, and without a task."""

    round_number: int
    annotated: List[str]
    skipped: List[str]
    left: List[str]
    no_task: List[str]

    @property
    def done(self) -> bool:
        """Every image of the round annotated or skipped."""
        return not self.left and not self.no_task

    def line(self) -> str:
        total = len(self.annotated) + len(self.skipped) + len(self.left) + len(self.no_task)
        return (f"round {self.round_number}: {len(self.annotated)} of {total} annotated, {len(self.skipped)} skipped"
                + (f", {len(self.no_task)} without a task" if self.no_task else ""))


def pushed_project(client: Client, round_dir: Path) -> Tuple[label_studio.RoundExpectation, int]:
    """The round's expectation and the project it was pushed to (read from the run's record: a copy of the run
    folder reads the project its original pushed the round to). ``ProjectGoneError`` when there is none on this
    server."""
    expected = label_studio.target_round(round_dir)
    run_dir = run_folder_of(round_dir)
    record = read_project_record(run_dir)
    if record is None or normal_url(record["url"]) != client.url:
        where = "no Label Studio project" if record is None else f"its project on {record['url']}"
        raise ProjectGoneError(f"{client.url}: round {expected.round_number} ({round_dir}) was not pushed to this "
                               f"server (the run has {where}); push it first: python3 label_studio.py push "
                               f"--round_dir {round_dir}")
    project_id = int(record["project"])
    check_project(client, project_id, run_dir)
    return expected, project_id


def round_progress(client: Client, round_dir: PathLike) -> RoundProgress:
    """How many of the round's images are annotated, skipped, left (one light listing of its tasks: no results)."""
    expected, project_id = pushed_project(client, Path(round_dir))
    order = ["left", label_studio.SKIPPED, "annotated"]  # an image in two tasks: the furthest one counts
    state: Dict[str, str] = {}
    for task in round_tasks(client, project_id, expected.run_id, expected.round_number, "task_only"):
        name = task["data"][label_studio.NAME_KEY]
        now = ("annotated" if (task.get("total_annotations") or 0) > 0 else
               label_studio.SKIPPED if (task.get("cancelled_annotations") or 0) > 0 else "left")
        state[name] = max(now, state.get(name, "left"), key=order.index)
    names = sorted(expected.sizes)
    return RoundProgress(expected.round_number, [n for n in names if state.get(n) == "annotated"],
                         [n for n in names if state.get(n) == label_studio.SKIPPED],
                         [n for n in names if state.get(n) == "left"], [n for n in names if n not in state])


def pull_round(client: Client, round_dir: PathLike, accept_partial: bool = False) -> label_studio.ImportResult:
    """The round's annotations, read through the API (no export file), -> ``<name>_segmentation.png`` in the round
    folder and who answered and how long into its to_annotate.csv, by ``label_studio.write_returned`` (the rules of
    ``label_studio.py import``: never over a mask). Refused, nothing written: an image without a task
    (``TaskGoneError``), tasks neither annotated nor skipped unless ``accept_partial`` (``RoundNotDoneError``,
    listing them), every check of an export (``label_studio.ExportError``, ``MaskClashError``)."""
    round_dir = Path(round_dir)
    expected, project_id = pushed_project(client, round_dir)
    tasks = round_tasks(client, project_id, expected.run_id, expected.round_number)
    source = client.project_url(project_id)
    no_task = sorted(set(expected.sizes) - set(tasks_by_image(tasks)))
    if no_task:
        raise TaskGoneError(f"{source}: round {expected.round_number} has no task for {', '.join(no_task)} (deleted "
                            f"by hand?); push the round again to make them: python3 label_studio.py push "
                            f"--round_dir {round_dir}")
    content = label_studio.export_content(tasks, expected, source)
    waiting = [(name, client.task_url(project_id, content.unreturned_tasks[name].task_id))
               for name, why in content.not_returned.items() if why == label_studio.NOT_ANNOTATED]
    if waiting and not accept_partial:
        raise RoundNotDoneError(f"{source}: round {expected.round_number} has {len(waiting)} image(s) neither "
                                "annotated nor skipped: " + ", ".join(f"{n} ({u})" for n, u in waiting)
                                + "; annotate or skip them, or accept the round as it is (--accept_partial: they "
                                "go back to the pool)", waiting)
    result = label_studio.write_returned(content, expected)
    log.info("round %d pulled from %s: %d mask(s) written, %d already there, %d not returned", expected.round_number,
             source, len(result.written), len(result.unchanged), len(result.not_returned))
    return result
