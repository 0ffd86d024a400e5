"""The oracles: how an image the strategy selected gets its mask (the trainer's ``--oracle``).

One loop, one small interface (``Oracle``); the loop does not know which oracle it has:

- when an epoch's images are chosen, ``has_masks`` says whether their masks can be read now. When not, the
  loop hands the round to the person (``hand_over``: the round folder with the model's proposals, and whatever
  the oracle sends them through), and the run stops until the masks are back;
- when a run resumes, ``resumed_round`` is the round whose masks came back (checked by ``make_oracle`` before
  anything is written): the loop trains on it as the selection of its epoch.

``GroundTruthOracle`` (the simulation: every mask is in the data set already) and ``FolderOracle`` (a person:
the round folder, and Label Studio's files to import by hand) implement it; ``make_oracle`` builds the one of a
run. Each mask of a person's round is accepted from the round folder or the data set's mask folder
(annotation_rounds), and where it was accepted is recorded (``mask_sources``).
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Dict, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

import label_studio
from annotation_rounds import (WHY_SELECTED, AcceptedRound, RoundItem, accept_round, accepted_mask_path,
                               label_existing_masks, make_mask_folder, masks_saved_early, round_dir, write_round)
from datasets_skin import SampleFiles
from run_folder import ResumeState, RunFolder
from safe_io import atomic_path

ORACLES = ("ground_truth", "folder")
log = logging.getLogger("trainer.oracle")  # under the trainer's logger: its lines go to log.txt


class Oracle(ABC):
    """How a selected image gets its mask. ``notes``: said once when the run starts (e.g. masks accepted with a
    remark); ``mask_sources``: labeled image -> the round folder (relative to the run folder) its mask was accepted
    from, for masks not in the data set's mask folder (the resume state records them)."""

    name: ClassVar[str]

    def __init__(self, notes: Sequence[str] = (), mask_sources: Optional[Mapping[str, str]] = None,
                 resumed: Optional[AcceptedRound] = None) -> None:
        self.notes = list(notes)
        self.mask_sources: Dict[str, str] = dict(mask_sources or {})
        self._resumed = resumed

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


class FolderOracle(Oracle):
    """``--oracle folder``: a person saves the masks, in any tool, into the round folder or the data set's mask
    folder (made when the oracle is, so that a read-only data folder stops the run before it writes anything).
    Each round folder also holds Label Studio's files (the interface, the tasks with the proposals), imported by
    hand; ``output`` is the run's (Label Studio's document root, by default)."""

    name = "folder"

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
        self.write_label_studio_files(round_folder, epoch, items)
        folder.write_awaiting(dict(epoch=epoch, round_dir=str(round_folder.relative_to(folder.path)),
                                   images=[item.sample.image_path.name for item in items], pool_scores=pool_scores,
                                   strategy=strategy))
        return round_folder

    def write_label_studio_files(self, round_folder: Path, epoch: int, items: Sequence[RoundItem]) -> None:
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


def make_oracle(kind: str, folder: RunFolder, state: Optional[ResumeState], dataset, accept_partial: bool,
                output: Path) -> Oracle:
    """The oracle ``kind`` (one of ORACLES) of a run, after every check of its masks, nothing written before (the
    data set's mask folder excepted, for a person's oracle): a resumed run's waiting round is accepted (``state``:
    its ResumeState) and ``dataset`` reads every labeled mask from where it was accepted; a new person's run takes
    the images that have masks as its initial labeled set (marked in ``dataset``). Raises RoundError."""
    person = kind != GroundTruthOracle.name
    accepted, notes = accept_round(folder, state, dataset.samples, person, accept_partial) \
        if state is not None else (None, [])
    if not person:
        return GroundTruthOracle()
    if state is None:
        labeled, notes = label_existing_masks(dataset.samples)
        dataset.mark_labeled(labeled)
        return FolderOracle(dataset.samples, output, notes=notes)
    sources = {**state.mask_sources, **(accepted.mask_sources if accepted is not None else {})}
    for i, sample in enumerate(list(dataset.samples)):
        if sample.name in sources:
            dataset.read_mask_from(i, accepted_mask_path(folder, sample, sources))
    notes += masks_saved_early(dataset.samples, state.labeled_names, accepted)
    return FolderOracle(dataset.samples, output, notes=notes, mask_sources=sources, resumed=accepted)

