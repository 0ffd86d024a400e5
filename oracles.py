"""The oracles: how an image the strategy selected gets its mask (the trainer's ``--oracle``).

One loop, one small interface (``Oracle``); the loop does not know which oracle it has:

- when an epoch's images are chosen, ``has_masks`` says whether their masks can be read now. When not, the
  loop hands the round to the person (``hand_over``: the round folder with the model's proposals, and whatever
  the oracle sends them through), and the run stops until the masks are back;
- when a run resumes, ``resumed_round`` is the round whose masks came back (checked by ``make_oracle`` before
  anything is written): the loop trains on it as the selection of its epoch.

``GroundTruthOracle`` (the simulation: every mask is in the data set already), and for a person (``PersonOracle``)
``FolderOracle`` (the round folder, and Label Studio's files to import by hand) and ``LabelStudioOracle`` (the
round pushed to and pulled from Label Studio through its API; with ``--wait`` the run waits for it) implement it;
``make_oracle`` builds the one of a run. Each mask of a person's round is accepted from the round folder or the
data set's mask folder (annotation_rounds), and where it was accepted is recorded (``mask_sources``).
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

import label_studio
import label_studio_api
from annotation_rounds import (WHY_SELECTED, AcceptedRound, RoundError, RoundItem, accept_round, accepted_mask_path,
                               check_masks, label_existing_masks, make_mask_folder, masks_saved_early, read_round, round_dir,
                               round_instructions, write_round)
from datasets_skin import SampleFiles
from distributed import Ranks
from run_folder import ResumeState, RunFolder
from safe_io import atomic_path

ORACLES = ("ground_truth", "folder", "label_studio")
PERSON_ORACLES = ("folder", "label_studio")
WAIT_POLL_S = 5.0  # --wait: how often Label Studio is asked how far the round is
log = logging.getLogger("trainer.oracle")  # under the trainer's logger: its lines go to log.txt


class Oracle(ABC):
    """How a selected image gets its mask. ``notes``: said once when the run starts (e.g. masks accepted with a
    remark); ``mask_sources``: labeled image -> the round folder (relative to the run folder) its mask was accepted
    from, for masks not in the data set's mask folder (the resume state records them); ``lead_times``: image ->
    the seconds a person spent on its mask, where the annotation tool says (al_selection.csv's lead_time_s)."""

    name: ClassVar[str]

    def __init__(self, notes: Sequence[str] = (), mask_sources: Optional[Mapping[str, str]] = None,
                 resumed: Optional[AcceptedRound] = None) -> None:
        self.notes = list(notes)
        self.mask_sources: Dict[str, str] = dict(mask_sources or {})
        self._resumed = resumed

    @property
    def lead_times(self) -> Dict[str, float]:
        """Of the round resumed now (a person's oracle): Label Studio's lead times, imported into the round folder;
        empty for the simulation and for masks made in other tools."""
        return {} if self._resumed is None else dict(self._resumed.lead_times)

    def resumed_round(self, epoch: int) -> Optional[AcceptedRound]:
        """The round of ``epoch`` whose masks came back while the run was stopped (its selection), if any."""
        return self._resumed if self._resumed is not None and self._resumed.epoch == epoch else None

    @abstractmethod
    def has_masks(self, epoch: int) -> bool:
        """Whether the masks of ``epoch``'s selection can be read now."""

    @abstractmethod
    def hand_over(self, folder: RunFolder, epoch: int, items: Sequence[RoundItem], pool_scores: Dict[str, float],
                  figure: Optional[np.ndarray], strategy: str) -> Path:
        """Give the person the round of ``epoch`` (the selected images, in selection order, with the model's
        proposals); returns the round folder. Written last: the marker that the run waits for it, with the
        selection (``strategy`` made it) and the pool's scores, so that ``--resume`` continues this epoch exactly
        as an uninterrupted run would."""


class GroundTruthOracle(Oracle):
    """``--oracle ground_truth`` (the simulation): every selected image's mask is in the data set already."""

    name = "ground_truth"

    def has_masks(self, epoch: int) -> bool:
        return True

    def hand_over(self, folder: RunFolder, epoch: int, items: Sequence[RoundItem], pool_scores: Dict[str, float],
                  figure: Optional[np.ndarray], strategy: str) -> Path:
        raise TypeError("the ground_truth oracle has every mask: it has no round to hand over")


class PersonOracle(Oracle):
    """A person makes the masks (``FolderOracle``, ``LabelStudioOracle``): each round is a round folder of the run
    (the selected images' copies, the model's proposals, their outlines; ``annotation_rounds.write_round``) that the
    oracle then ``send``s its own way. The masks come back into the round folder or the data set's mask folder
    (made when the oracle is, so that a read-only data folder stops the run before it writes anything); ``output``
    is the run's (Label Studio's document root, by default)."""

    def __init__(self, samples: Sequence[SampleFiles], output: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        make_mask_folder(samples[0])
        self.output = Path(output)

    def has_masks(self, epoch: int) -> bool:
        return self.resumed_round(epoch) is not None

    def hand_over(self, folder: RunFolder, epoch: int, items: Sequence[RoundItem], pool_scores: Dict[str, float],
                  figure: Optional[np.ndarray], strategy: str) -> Path:
        round_folder = round_dir(folder, epoch)
        write_round(round_folder, items)
        if figure is not None:
            with atomic_path(round_folder / WHY_SELECTED) as tmp:
                Image.fromarray(figure).save(tmp)
        self.send(round_folder, epoch, items)
        folder.write_awaiting(dict(epoch=epoch, round_dir=str(round_folder.relative_to(folder.path)),
                                   images=[item.sample.image_path.name for item in items], pool_scores=pool_scores,
                                   strategy=strategy))
        return round_folder

    @abstractmethod
    def send(self, round_folder: Path, epoch: int, items: Sequence[RoundItem]) -> None:
        """Hand the written round folder to the person (before the run's marker says it waits)."""

    def instructions(self, round_folder: Path, epoch: int) -> List[str]:
        """What the person is told when the run stops for the round."""
        return round_instructions(round_folder, epoch)

    def accept(self, accepted: AcceptedRound, folder: RunFolder, dataset) -> None:
        """The round whose masks came back: its selection is ``resumed_round``'s, and ``dataset`` reads each mask
        from where it was accepted."""
        self._resumed = accepted
        self.mask_sources.update(accepted.mask_sources)
        read_masks_from_sources(folder, dataset, self.mask_sources)


class FolderOracle(PersonOracle):
    """``--oracle folder``: the person saves the masks, in any tool; each round folder also holds Label Studio's
    files (the interface, the tasks with the proposals), to import by hand and export back
    (``label_studio.py import``)."""

    name = "folder"

    def send(self, round_folder: Path, epoch: int, items: Sequence[RoundItem]) -> None:
        """The round's Label Studio files (``label_studio.write_trainer_round``) and how to use them; without the
        SDK, or for a round Label Studio cannot take (a document root that does not hold the run), one line saying
        why: the PNG round serves any tool either way."""
        try:
            tasks, root = label_studio.write_trainer_round(round_folder, items, epoch, self.output)
        except label_studio.SdkMissingError:
            log.info("no Label Studio files for this round: label-studio-sdk is not installed (to enable them: %s)",
                     label_studio.SDK_HINT)
            return
        except label_studio.RoundFolderError as err:
            log.warning("no Label Studio files for this round: %s", err)
            return
        log.info("round %d for Label Studio (the server started with %s=%s): a Local Files storage on the round "
                 "folder, then import %s into the run's project (its labelling interface: %s)", epoch,
                 label_studio.DOCUMENT_ROOT_VARIABLE, root, tasks.name, label_studio.INTERFACE_FILE)
        log.info("after annotating, export JSON; `python3 label_studio.py import --export EXPORT.json --round_dir "
                 "%s` writes the masks into the round folder", round_folder)


class LabelStudioOracle(PersonOracle):
    """``--oracle label_studio``: each round goes to the run's Label Studio project through its API
    (``label_studio.push_round``: tasks with the proposals as predictions, images through a Local Files storage
    or uploaded), and comes back through it (``pull``: the masks into the round folder, by the rules of
    ``label_studio.py import``). ``client``: the connected server; ``backend_url``: an ML backend
    (label_studio_backend.py) to connect to the project, interactive, once."""

    name = "label_studio"

    def __init__(self, samples: Sequence[SampleFiles], output: Path, client: label_studio_api.Client,
                 backend_url: Optional[str] = None, **kwargs) -> None:
        super().__init__(samples, output, **kwargs)
        self.client, self.backend_url = client, backend_url
        self.project_url = ""

    def __getstate__(self) -> dict:
        """Pickled (rank 0 gives the oracle to the other processes of a run on several) without the server's client
        and its token: rank 0 alone talks to Label Studio."""
        return {**self.__dict__, "client": None}

    def send(self, round_folder: Path, epoch: int, items: Sequence[RoundItem]) -> None:
        label_studio.write_trainer_round(round_folder, items, epoch, self.output)
        self.push(round_folder)

    def push(self, round_folder: Path) -> None:
        """The round's tasks into the run's project (never twice), and the ML backend connected to it."""
        pushed = label_studio.push_round(self.client, round_folder)
        self.project_url = pushed.project_url
        if self.backend_url:
            self.connect_backend(pushed.project_id)

    def bring_back(self, round_folder: Path, accept_partial: bool, wait: bool) -> None:
        """At --resume, the round waiting for a person: pushed (it may have been handed over as a folder round, or
        its push cut short), then its annotations pulled into the round folder, or waited for (``wait``)."""
        self.push(round_folder)
        if wait:
            self.wait(round_folder)
        else:
            self.pull(round_folder, accept_partial)

    def connect_backend(self, project_id: int) -> None:
        """The ML backend connected to the run's project, interactive (once: an existing connection is kept)."""
        with self.client.calling("listing the project's ML backends"):
            connected = [b for b in self.client.http("GET", "/api/ml/", params=dict(project=project_id)).json()
                         if str(b.get("url", "")).rstrip("/") == self.backend_url.rstrip("/")]
        if connected:
            return
        with self.client.calling(f"connecting the ML backend {self.backend_url}"):
            label_studio.connect_ml_backend(self.client.http, project_id, self.backend_url)
        log.info("the ML backend %s answers clicks and boxes in %s", self.backend_url, self.project_url)

    def instructions(self, round_folder: Path, epoch: int) -> List[str]:
        count = len(read_round(round_folder))
        return [f"round {epoch} waits for {count} masks in Label Studio: {self.project_url} (Label All Tasks: correct "
                "each proposal and Submit; Skip sends an image back to the unlabeled pool)",
                f"the round's files: {round_folder}"]

    def pull(self, round_folder: Path, accept_partial: bool) -> None:
        """The round's annotations, through the API, into the round folder (``label_studio.pull_round``)."""
        result = label_studio.pull_round(self.client, round_folder, accept_partial)
        log.info(label_studio.summary(result, round_folder))

    def wait(self, round_folder: Path, poll_s: float = WAIT_POLL_S) -> None:
        """Until every task of the round is annotated or skipped (a progress line whenever that changes; an
        unreachable server is waited for, said once), then pull it (skipped images go back to the pool)."""
        said, unreachable = "", False
        while True:
            try:
                progress = label_studio.round_progress(self.client, round_folder)
            except label_studio_api.ServerUnreachableError as err:
                if not unreachable:
                    log.warning("%s; waiting for it", err)
                unreachable = True
                time.sleep(poll_s)
                continue
            unreachable = False
            if progress.line() != said:
                said = progress.line()
                log.info(said)
            if progress.done:
                break
            time.sleep(poll_s)
        self.pull(round_folder, accept_partial=True)


def read_masks_from_sources(folder: RunFolder, dataset, sources: Mapping[str, str]) -> None:
    """``dataset`` reads the mask of each image in ``sources`` from the round folder it was accepted from."""
    for i, sample in enumerate(list(dataset.samples)):
        if sample.name in sources:
            dataset.read_mask_from(i, accepted_mask_path(folder, sample, sources))


def round_masks_present(folder: RunFolder, waiting: dict, samples: Sequence[SampleFiles]) -> bool:
    """Whether every image of the waiting round has a mask file already (in its round folder, or the data set's
    mask folder): a round handed over as a folder round and annotated so needs nothing from Label Studio."""
    names = {Path(image).stem for image in waiting["images"]}
    chosen = [sample for sample in samples if sample.name in names]
    return len(chosen) == len(names) and not check_masks(chosen, folder.path / waiting["round_dir"]).missing


def oracle_switch(kind: str, recorded: Optional[str]) -> Optional[str]:
    """Why a resumed run may not continue with the oracle ``kind`` after ``recorded`` (None: it may): a person and
    the simulation do not mix; the folder and Label Studio (both a person) do."""
    if recorded is None or (recorded in PERSON_ORACLES) == (kind in PERSON_ORACLES):
        return None
    return (f"the run was made with --oracle {recorded} and is resumed with --oracle {kind}: a person's masks and the "
            "simulation's ground truth do not mix in one run")


def shared(make: Callable[[], Oracle], dataset, ranks: Ranks) -> Oracle:
    """``make()``'s oracle; on several processes (torchrun) rank 0 makes it (reading the run folder and a person's
    masks) and gives it to the others, with the images it labeled in ``dataset`` and the masks it accepted from
    round folders (no shared file system is assumed)."""
    def made() -> tuple:
        oracle = make()
        accepted = [i for i, name in enumerate(dataset.names) if name in oracle.mask_sources] if ranks.active else []
        return oracle, dataset.labeled_indices, {i: dataset.resized_mask(i) for i in accepted}

    oracle, labeled, masks = ranks.from_first(made)
    if not ranks.first:
        dataset.mark_labeled(labeled)
        for index, mask in masks.items():
            dataset.use_mask(index, mask)
    return oracle


def make_oracle(kind: str, folder: RunFolder, state: Optional[ResumeState], dataset, accept_partial: bool,
                output: Path, client: Optional[label_studio_api.Client] = None,
                backend_url: Optional[str] = None, wait: bool = False) -> Oracle:
    """The oracle ``kind`` (one of ORACLES) of a run, after every check of its masks, nothing written before (the
    data set's mask folder excepted, for a person's oracle; Label Studio's annotations of a waiting round, pulled
    into its round folder): a resumed run's waiting round is accepted (``state``: its ResumeState) and ``dataset``
    reads every labeled mask from where it was accepted; a new person's run takes the images that have masks as its
    initial labeled set (marked in ``dataset``). ``client``, ``backend_url``: Label Studio's; ``wait``: a round
    waiting in Label Studio is waited for (else pulled as it is). Raises RoundError, and label_studio's and
    label_studio_api's errors while pulling."""
    person = kind in PERSON_ORACLES
    make = {"folder": lambda **kw: FolderOracle(dataset.samples, output, **kw),
            "label_studio": lambda **kw: LabelStudioOracle(dataset.samples, output, client, backend_url, **kw)}
    if state is None:
        if not person:
            return GroundTruthOracle()
        labeled, notes = label_existing_masks(dataset.samples)
        dataset.mark_labeled(labeled)
        return make[kind](notes=notes)
    waiting = folder.read_awaiting()
    if kind == LabelStudioOracle.name and waiting is not None and waiting["epoch"] == state.epoch + 1 \
            and not round_masks_present(folder, waiting, dataset.samples):
        make[kind]().bring_back(folder.path / waiting["round_dir"], accept_partial, wait)
        accept_partial = accept_partial or wait  # waited for: what was skipped goes back to the pool
    accepted, notes = accept_round(folder, state, dataset.samples, person, accept_partial)
    switch = oracle_switch(kind, state.settings.get("oracle", folder.read_config().get("oracle")))
    if switch:
        raise RoundError("oracle_switch", switch)
    if not person:
        return GroundTruthOracle()
    oracle = make[kind](notes=notes, mask_sources=state.mask_sources)
    if accepted is not None:
        oracle.accept(accepted, folder, dataset)
    else:
        read_masks_from_sources(folder, dataset, oracle.mask_sources)
    oracle.notes += masks_saved_early(dataset.samples, state.labeled_names, accepted)
    return oracle
