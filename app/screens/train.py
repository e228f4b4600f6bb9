"""Train: start background training jobs and follow them.

Jobs are processes with their state on disk (``rd.jobs``), so leaving this page, reloading it or
restarting the app loses nothing: the table is read back from the jobs folder at every poll,
and each poll is also a scheduler step (it starts queued jobs and notices dead ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app import sidebar, state
from rd import jobs
from rd.adapt import ADAPT_MODES
from rd.backbones import list_backbones
from rd.checkpoints import CheckpointError, read_metadata
from rd.data import DataError
from rd.data.sources import DataSource
from rd.devices import gpu_count
from rd.errors import RDError
from rd.files import file_sha256
from rd.geometry import RESIZE_MODES
from rd.manifest import ManifestError, ModelEntry, all_models, delete_model, rename_model
from rd.training import LR_SCHEDULES, TrainConfig

POLL_S = 2.0
SCRATCH = "scratch"
NONCE = "train::nonce"
SELECTED = "train::job"
ERROR = "train::error"
PREFILL = "train::prefill"  # set by state.train_call_to_action
DELETING = "train::deleting"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else (
        f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s")


def _index(options: list[str], wanted: str | None) -> int:
    return options.index(wanted) if wanted in options else 0


def _init_choices(backbone: str) -> dict[str, ModelEntry | None]:
    """Where a job can start: from scratch, or from any registered student of this backbone."""
    try:
        entries = [e for e in all_models() if e.backbone == backbone]
    except ManifestError as error:
        st.warning(f"Cannot list the registered models: {error}")
        entries = []
    return {SCRATCH: None, **{f"{e.dataset} / {e.category} ({e.path.name})": e
                              for e in sorted(entries, key=lambda e: (e.dataset, e.category))}}


def _apply_prefill(names: list[str]) -> None:
    """Another page's "Train a model" button: the form starts on its data and category."""
    prefill = st.session_state.pop(PREFILL, None)
    if not prefill or prefill.get("source") not in names:
        return
    st.session_state["train::source"] = names.index(prefill["source"])
    st.session_state["train::category"] = prefill["category"]
    if prefill.get("backbone") in list_backbones():
        st.session_state["train::backbone"] = prefill["backbone"]


# The Train page's position-statistics choices -> TrainConfig.position_stats
POSITION_CHOICES: dict[str, bool | str] = {"off": False, "on": True, "auto": "auto",
                                           "envelope": "envelope", "adaptive": "adaptive"}
# ... its aligned-statistics choices -> TrainConfig.aligned_stats
ALIGNED_CHOICES: dict[str, bool | str] = {"off": False, "on": True, "auto": "auto"}
# ... and its turn-average choices -> TrainConfig.turn_average
TURN_CHOICES: dict[str, bool | str] = {"off": False, "on": True, "auto": "auto"}


def _beyond_paper_options() -> dict[str, str | float | bool]:
    """The options beyond the paper (issue 11), folded away; only those changed are returned,
    so the default stays the paper's recipe."""
    chosen: dict[str, str | float | bool] = {}
    with st.expander("Beyond the paper (input geometry, teacher adaptation, augmentation, "
                     "learning-rate schedule, weight average, position and aligned "
                     "statistics, turn average)"):
        columns = st.columns(5)
        resize = columns[0].selectbox(
            "Input geometry", list(RESIZE_MODES), key="train::resize",
            help="squash: the paper (resize to the square); letterbox: keep the aspect ratio; "
            "tile: overlapping tiles near native resolution (thin defects on large images); "
            "multiscale: the tiles and the whole image together (thin defects and large "
            "faint regions).")
        adapt = columns[1].selectbox(
            "Teacher adaptation", list(ADAPT_MODES), key="train::teacher_adapt",
            help="none: the paper's ImageNet teacher; bn: its deepest batch-norm statistics "
            "blended with the normal images'; ssl: a short compactness fine-tune.")
        augment = columns[2].selectbox(
            "Augmentation", ["none", "auto"], key="train::augment",
            help="auto keeps only the transforms whose augmented normal images stay in "
            "distribution as the teacher sees them (recorded in the checkpoint).")
        schedule = columns[3].selectbox(
            "Learning rate", list(LR_SCHEDULES), key="train::lr_schedule",
            help="constant: the paper; cosine: falls toward 0 over the epochs, so the saved "
            "model does not land on one of the loss spikes of a constant rate.")
        ema = columns[4].number_input(
            "Weight average (epochs)", min_value=0.0, max_value=100.0, value=0.0, step=0.5,
            key="train::ema",
            help="0: save the last weights (the paper); E: save a moving average of the "
            "student's weights with a half-life of E epochs, which damps the loss spikes "
            "without lowering the rate (1 is a good start).")
        position = POSITION_CHOICES[st.selectbox(
            "Position statistics (parts that lie in place)", list(POSITION_CHOICES),
            key="train::position_stats",
            help="Adds a per-position model of the normal images' teacher features to the "
            "heat map: large faint regions and misplaced parts the student rebuilds show up. "
            "Only for parts that always lie in the same place and pose (a fixture, a "
            "conveyor); auto keeps it only if the normal training images say they do "
            "(recorded in the checkpoint); envelope, for parts of unknown kind, models the "
            "augmented copies too and shows only what exceeds every normal image at that "
            "place; adaptive is auto with the envelope where the parts do not lie in place. "
            "The image score stays the paper's unless the next box is ticked (not with "
            "envelope; with adaptive, only where the parts lie in place).")]
        position_score = st.checkbox(
            "... and in the image score", key="train::position_score",
            disabled=position in (False, "envelope"),
            help="Scores an image by the larger of the paper's score and the position "
            "statistics', each measured against the most surprising normal training image: "
            "a large faint region then makes the image defective, not only its heat map.")
        aligned = ALIGNED_CHOICES[st.selectbox(
            "Aligned statistics (parts that turn and shift a little)", list(ALIGNED_CHOICES),
            key="train::aligned_stats",
            help="Registers each image onto the normal images' template (a turn of up to 12 "
            "degrees and a shift) and adds a per-pixel colour model of the registered normal "
            "images to the heat map: a bent or moved outline, a missing piece show up where "
            "the normals have something else. auto keeps it only if the registered normal "
            "training images are alike (not textures, nor parts that turn freely or change "
            "shape; recorded in the checkpoint). The image score stays the paper's. Checkpoints "
            "with it run in torch (no ONNX graph).")]
        turns = TURN_CHOICES[st.selectbox(
            "Turn average (parts that lie at any angle)", list(TURN_CHOICES),
            key="train::turn_average",
            help="Scores each image also turned by 90, 180 and 270 degrees and averages the "
            "paper's maps, turned back: what the student rebuilds badly in one orientation "
            "only fades, a defect stays. Four passes an image. auto keeps it only if "
            "quarter-turned normal training images still look normal to the teacher "
            "(recorded in the checkpoint).")]
    for option, value, default in (("resize", resize, "squash"),
                                   ("teacher_adapt", adapt, "none"),
                                   ("augment", augment, "none"),
                                   ("lr_schedule", schedule, "constant"),
                                   ("ema", float(ema), 0.0),
                                   ("position_stats", position, False),
                                   ("position_score", position not in (False, "envelope")
                                    and position_score, False),
                                   ("aligned_stats", aligned, False),
                                   ("turn_average", turns, False)):
        if value != default:
            chosen[option] = value
    return chosen


def _form() -> None:
    """The training form; a click on Start submits it once (idempotent per form and session)."""
    chosen = state.selection()
    defaults = TrainConfig()
    sources = state.data_sources()
    names = [s.name for s in sources]
    _apply_prefill(names)
    left, middle, right = st.columns(3)
    source: DataSource = sources[left.selectbox(
        "Data", range(len(sources)), format_func=lambda i: names[i], key="train::source",
        index=_index(names, chosen.source.name if chosen else None))]
    try:
        categories = state.categories(source)
    except DataError as error:
        st.error(str(error))
        return
    category = middle.selectbox("Category", categories, key="train::category",
                                index=_index(categories, chosen.category if chosen else None))
    backbones = list_backbones()
    backbone = right.selectbox("Backbone", backbones, key="train::backbone",
                               index=_index(backbones, chosen.backbone if chosen else None))
    choices = _init_choices(backbone)
    start = st.selectbox("Start from", list(choices), key=f"train::init::{backbone}",
                         help="A registered student to fine-tune (same backbone; the image size "
                         "follows it), or random initialisation.")
    init = choices[start]
    fixed_size = None
    if init is not None:
        try:
            fixed_size = read_metadata(init.path)["preprocess"]["size"]
        except (CheckpointError, KeyError) as error:
            st.error(f"Cannot fine-tune from {init.path}: {error}")
            return
    columns = st.columns(4)
    epochs = columns[0].number_input("Epochs", 1, 100_000, defaults.epochs, key="train::epochs")
    batch = columns[1].number_input("Batch size (global)", 1, 4096, defaults.batch_size,
                                    key="train::batch")
    size = columns[2].number_input("Image size", 32, 2048, fixed_size or defaults.image_size,
                                   step=32, key=f"train::size::{fixed_size}",
                                   disabled=fixed_size is not None)
    lr = columns[3].number_input("Learning rate", 1e-6, 1.0, defaults.lr, format="%.5f",
                                 step=1e-4, key="train::lr")
    columns = st.columns(3)
    gpus = gpu_count()
    devices = ["cpu", *(["cuda"] if gpus else [])]
    device = columns[0].selectbox("Device", devices, index=len(devices) - 1,
                                  key="train::device")
    most = gpus if device == "cuda" else (os.cpu_count() or 1)
    nproc = columns[1].number_input(
        "GPUs" if device == "cuda" else "Processes", 1, max(1, most), 1, key="train::nproc",
        help="More than one: distributed data parallel (torchrun); the batch size is split "
        "across them, so the same learning rate applies.")
    name = columns[2].text_input("Name (optional)", key="train::name", max_chars=60)
    beyond = _beyond_paper_options()

    config = TrainConfig(backbone=backbone, image_size=int(size), epochs=int(epochs),
                         batch_size=int(batch), lr=float(lr), device=device,
                         init=str(init.path) if init is not None else None, **beyond)
    args = ["--data", str(source.root), "--category", category, "--backbone", backbone,
            "--epochs", str(epochs), "--batch-size", str(batch), "--image-size", str(size),
            "--lr", repr(float(lr)), "--device", device]
    if init is not None:
        args += ["--init", str(init.path)]
    for option, value in beyond.items():
        args += [f"--{option.replace('_', '-')}", str(value)]
    command = f"python -m rd train {shlex.join(args)}"
    st.caption(f"`{command}`" + (f" on {nproc} processes" if nproc > 1 else ""))
    if st.button("Start training", type="primary", icon=":material/play_arrow:",
                 key="train::start"):
        _submit(config, source, category, name, int(nproc), command)


def _submit(config: TrainConfig, source: DataSource, category: str, name: str, nproc: int,
            command: str) -> None:
    """Submit with a key made of the form and a per-session nonce: a second click (or a rerun)
    of the same form returns the same job; once that job is over, the same form starts anew."""
    form = {"config": config.to_dict(), "data": str(source.root), "category": category,
            "name": name, "dataset": source.name, "nproc": nproc}

    def key() -> str:
        payload = json.dumps({**form, "nonce": st.session_state[NONCE]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    st.session_state.setdefault(NONCE, secrets.token_hex(8))
    try:
        previous = [j for j in jobs.list_jobs() if j.spec.get("idempotency_key") == key()]
        if previous and previous[0].state not in jobs.ACTIVE:
            st.session_state[NONCE] = secrets.token_hex(8)
        job = jobs.submit(config, source.root, category, name=name, dataset=source.name,
                          nproc=nproc, idempotency_key=key(), command=command)
    except (RDError, OSError) as error:
        st.error(f"Not started: {error}")
        return
    st.session_state[SELECTED] = job.id
    st.success(f"Job {job.id}: {job.state}.")


def _loss_figure(records: list[dict]) -> go.Figure:
    figure = go.Figure(go.Scatter(x=[r["epoch"] for r in records],
                                  y=[r["loss"] for r in records], mode="lines+markers",
                                  name="training loss"))
    figure.update_layout(height=300, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                         title="Training loss", xaxis_title="epoch", yaxis_title="loss")
    return figure


def _table(all_jobs: list[jobs.Job]) -> pd.DataFrame:
    """One row per job, newest first; a ``problem`` column when a job folder is broken."""
    rows = []
    broken = any(job.state == jobs.BROKEN for job in all_jobs)
    for job in reversed(all_jobs):
        progress, records = job.progress(), job.metrics()
        rows.append({
            "job": job.id, "state": job.state,
            **({"problem": job.status.get("reason", "")} if broken else {}),
            "progress": progress.fraction,
            "epoch": f"{progress.epoch}/{progress.epochs}",
            "loss": records[-1]["loss"] if records else None,
            "ETA": _duration(progress.eta_s),
            "data": f"{job.spec['dataset']} / {job.spec['category']}",
            "backbone": job.spec["backbone"], "processes": job.spec["nproc"],
            "submitted": time.strftime("%Y-%m-%d %H:%M", time.localtime(job.spec["submitted"])),
        })
    return pd.DataFrame(rows)


@st.fragment(run_every=POLL_S)
def _jobs_panel() -> None:
    """The jobs table and the chosen job's details, redrawn every POLL_S seconds."""
    try:
        all_jobs = jobs.schedule()
    except (jobs.JobError, OSError) as error:
        st.error(f"Cannot read the jobs: {error}")
        return
    if not all_jobs:
        st.caption(f"No jobs yet. They are kept in {jobs.jobs_root()}.")
        return
    if any(job.state == "running" for job in all_jobs):
        st.caption("Running jobs pause while you click in the studio and go on after a few "
                   "quiet seconds, so pages answer at full speed ($RD_JOBS_YIELD_S).")
    st.dataframe(_table(all_jobs), hide_index=True, column_config={
        "progress": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0,
                                                    format="percent"),
        "loss": st.column_config.NumberColumn(format="%.4f")})
    by_id = {job.id: job for job in reversed(all_jobs)}
    if st.session_state.get(SELECTED) not in by_id:
        st.session_state[SELECTED] = next(iter(by_id))
    job = by_id[st.selectbox("Job", list(by_id), key=SELECTED)]
    _details(job)


def _details(job: jobs.Job) -> None:
    progress = job.progress()
    eta = f" · about {_duration(progress.eta_s)} left" if progress.eta_s is not None else ""
    st.progress(progress.fraction,
                text=f"**{job.state}** · epoch {progress.epoch}/{progress.epochs}{eta}")
    if job.state == jobs.BROKEN:
        st.warning(f"This job folder cannot be read: {job.status['reason']}. **Repair** gives "
                   "it a fresh status so that it can be resumed (its spec must be intact); "
                   "**Delete** removes its folder.")
    elif job.status.get("message"):
        st.caption(job.status["message"])
    if ERROR in st.session_state:
        st.error(st.session_state.pop(ERROR))
    left, right, link, remove = st.columns(4)
    if job.state in jobs.ACTIVE:
        left.button("Cancel", icon=":material/stop:", key=f"cancel::{job.id}",
                    on_click=_act, args=(jobs.cancel, job.id))
    else:
        _delete_with_confirmation(
            remove, f"job **{job.id}**: its folder, log and checkpoint (a model it registered "
            "stays)", f"job::{job.id}", lambda: jobs.delete(job.id))
    if job.state == jobs.BROKEN:
        left.button("Repair", icon=":material/build:", key=f"repair::{job.id}",
                    on_click=_act, args=(jobs.repair, job.id))
    if job.state in jobs.RESUMABLE:
        right.button("Resume", icon=":material/replay:", key=f"resume::{job.id}",
                     on_click=_act, args=(jobs.resume, job.id))
    if job.state == "succeeded":
        entry = _registered_entry(job)
        if entry is not None and link.button("Inspect the model", key=f"inspect::{job.id}",
                                             icon=":material/image_search:"):
            sidebar.show_model(entry)
            st.switch_page("screens/inspect.py")
    records = job.metrics()
    if records:
        st.plotly_chart(_loss_figure(records), key=f"loss::{job.id}")
    st.caption(f"`{job.command}` · {job.spec.get('nproc', 1)} process(es) · "
               f"folder `{job.folder}`")
    st.code(job.log_tail(40) or "(no output yet)", language="text", height=320)


def _registered_entry(job: jobs.Job) -> ModelEntry | None:
    """The model a finished job registered: the user's entry with the checkpoint's SHA-256."""
    try:
        stat = job.checkpoint.stat()
        digest = _sha256(str(job.checkpoint), stat.st_mtime, stat.st_size)
        return next((e for e in all_models() if not e.shipped and e.sha256 == digest
                     and e.dataset == job.spec.get("dataset")), None)
    except (OSError, ManifestError):
        return None


@st.cache_data(show_spinner=False, max_entries=64)
def _sha256(path: str, mtime: float, size: int) -> str:
    del mtime, size  # cache key only
    return file_sha256(path)


def _act(action: Callable[[str], jobs.Job], job_id: str) -> None:
    """Button callback (it runs before the redraw, which then shows the new state)."""
    try:
        action(job_id)
    except (RDError, OSError) as error:
        st.session_state[ERROR] = str(error)


def _delete_with_confirmation(column: DeltaGenerator, what: str, key: str,
                              delete: Callable[[], object]) -> None:
    """A "Delete…" button, then "Delete for good" or "Keep it": nothing is removed on one
    click. ``delete`` runs in the confirming click's callback; its error is shown here."""
    if f"{key}::error" in st.session_state:
        column.error(st.session_state.pop(f"{key}::error"))
    if st.session_state.get(DELETING) != key:
        column.button("Delete…", key=f"{key}::delete", icon=":material/delete:",
                      on_click=st.session_state.update, args=({DELETING: key},))
        return

    def confirmed() -> None:
        st.session_state.pop(DELETING, None)
        try:
            delete()
        except (RDError, OSError) as error:
            st.session_state[f"{key}::error"] = str(error)

    column.warning(f"Delete {what}? This cannot be undone.")
    confirm, keep = column.columns(2)
    keep.button("Keep it", key=f"{key}::keep", on_click=st.session_state.pop,
                args=(DELETING, None))
    confirm.button("Delete for good", key=f"{key}::confirm", type="primary",
                   on_click=confirmed)


def _models_panel() -> None:
    """Every model, shipped and trained; the user's own can be renamed or deleted."""
    try:
        entries = all_models()
    except ManifestError as error:
        st.error(f"Cannot list the models: {error}")
        return
    st.dataframe(pd.DataFrame([{
        "model": e.name or Path(e.file).stem, "data": f"{e.dataset} / {e.category}",
        "backbone": e.backbone, "created": e.created[:16].replace("T", " "),
        "epochs": e.epochs, "image AUROC": e.image_auroc, "shipped": e.shipped}
        for e in entries]), hide_index=True,
        column_config={"image AUROC": st.column_config.NumberColumn(format="%.3f")})
    own = {e.id: e for e in entries if not e.shipped}
    if not own:
        st.caption("Shipped models are read-only; the models your jobs train appear here.")
        return
    picked = st.selectbox("Your model", list(own), format_func=lambda i: own[i].label,
                          key="models::pick")
    entry = own[picked]
    left, right = st.columns(2)
    with left.form("models::rename", border=False):
        name = st.text_input("New name", value=entry.name, max_chars=60, key="models::name")
        if st.form_submit_button("Rename", icon=":material/edit:"):
            try:
                rename_model(entry.id, name)
            except ManifestError as error:
                st.error(str(error))
            else:
                st.rerun()
    _delete_with_confirmation(right, f"**{entry.label}** and its file", f"model::{entry.id}",
                              lambda: delete_model(entry.id))


def main() -> None:
    st.title("Train")
    st.caption("Each job runs as its own process and keeps going when you leave or reload "
               "this page; a finished model is registered and appears in Inspect, Evaluate "
               "and Review.")
    with st.container(border=True):
        _form()
    _jobs_panel()
    st.subheader("Models")
    _models_panel()


main()
