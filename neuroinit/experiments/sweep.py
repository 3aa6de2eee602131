"""Sweeps: a grid of training runs (task x model x rule x gain x seed x learning rate x profile) run in parallel,
locally or on a Dask cluster, resumable, with the best learning rate per condition chosen as the paper did.

A spec is a TOML file (``docs/experiments.md``; examples in ``examples/``)::

    name = "fig1-quick"
    description = "..."

    [base]                      # TrainConfig fields shared by every run (anything but the grid axes)
    hidden = 32
    iters = 300

    [flossing]                  # what a rule "X+flossing" adds: pre-flossing before training
    iters = 100                 # -> floss_iters (default 100, the paper's)
    mode = "local"              # -> floss_mode (default "local", the paper's)

    [grid]                      # every combination of the axes is one run ([[grid]] for several blocks)
    task = "romo"
    model = ["rate", "lif"]
    rule = ["bptt", "eprop", "eprop+flossing"]
    gain = [0.3, 1.0, 2.0]      # or {start = 0.0, stop = 3.0, step = 0.3} (stop included)
    seed = [0, 1]               # or {start = 0, count = 5}
    lr_scale = [0.5, 1.0, 2.0]  # multiples of the default rate (0.05 / N on Romo); or lr = [...] (absolute)
    profile = "ideal"
    base = {dt_ms = 5.0}        # optional, per block: overrides [base] for this block's runs
    match_eligibility = true    # optional, per block: LIF runs get tau_m = the rate net's tau in task units
                                # (their e-prop eligibility memory then equals the rate net's; comparison.py)

Every run is one :class:`~neuroinit.experiments.train.TrainConfig` with a single learning rate (the grid's
learning rates are separate runs, so they run in parallel), named by a hash of its content
(:func:`run_id`): the same config always maps to the same file ``DIR/runs/<label>_<id>.h5``, so runs shared by
two specs are trained once and a run's seed, not where it ran, fixes its result (one intra-op thread per run by
default: thread counts can change float reductions).

The whole spec is validated before any run starts (:class:`SpecError`, one line naming the file, the key and
what is allowed). ``DIR/sweep.json`` is the ledger (written atomically by the sweep process only): the text and
run ids of every spec run into ``DIR`` (by spec name: several specs may share a directory, and their common runs),
and per run its status (``complete``, ``diverged``, ``failed``, ``pending``), error and timings.
Whether a run is finished is decided from its run file's content (:func:`run_state`: the stored config equals
the planned one and the status is complete), never from the file's existence; a killed sweep loses no finished
run (run files are written atomically by :func:`~neuroinit.experiments.train.train`) and a rerun continues the
unfinished ones from their last checkpoint. A run that raises is recorded as ``failed`` with its error and
retried by the next invocation; one that diverges is a result (``diverged``; deterministic, not retried).

Executors: ``workers=0`` runs in this process; ``workers=N`` a local ``ProcessPoolExecutor`` (workers forked from
a fork server that imported torch once; they die with the sweep); ``scheduler="tcp://host:port"`` (or a ``distributed.Client``) an existing Dask
cluster. Workers that see ``DIR`` (a shared file system; checked with a token file) write their run files
there; others train into a temporary directory and send the file back to the sweep process, which writes it.
``ensemble=K`` makes up to K compatible runs one job, trained as one batched model
(:mod:`neuroinit.experiments.ensemble`), each into its own run file.

Best learning rate (the paper's choice, ``science.md`` 6.2): per condition (the config up to seed and learning
rate), the learning rate whose runs have the lowest mean over seeds of the final loss (the mean of the last 20
logged training losses); learning rates with fewer finished seeds (divergence, failure) rank after those with
more (:func:`select_best`). Other criteria for non-monotone curves (``select``, :data:`SELECT`): ``"min"`` the
lowest logged loss, ``"learning-time"`` the iteration from which the loss stays below 5% of its initial value
(:func:`learned_at`). A chosen rate at the lowest or highest rate of its condition's grid is flagged (the grid
may not contain the best rate): ``BestChoice.edge``, ``edge`` in the summary rows, marked in tables and figures.
"""

# The implementation lives in sibling modules (one responsibility each); this module re-exports every name.
from neuroinit.experiments.sweep_ids import (  # noqa: F401
    _ATTEMPTS,
    _CLUSTER_STALE_S,
    _FORMER_DEFAULTS,
    _LOCAL_STALE_S,
    _NOT_HASHED,
    _NOT_IN_BASE,
    _REPLICATE_FIELDS,
    ADDED_FIELDS,
    AXES,
    BLOCK_KEYS,
    DEFAULT_FLOSSING,
    FINISHED,
    FLOSS_SUFFIX,
    FLOSSING_KEYS,
    LOCK_FILE,
    MANIFEST,
    MANIFEST_KIND,
    MANIFEST_VERSION,
    RUNS_DIR,
    SELECT,
    SELECT_TEXT,
    SPEC_KEYS,
    STATUSES,
    TOKEN_FILE,
    PlannedRun,
    SpecError,
    SweepError,
    _canonical,
    _effective_lr,
    _field_default,
    _flosses,
    _matched_tau_m,
    _safe,
    comparable_config,
    condition_key,
    rule_label,
    run_id,
)
from neuroinit.experiments.sweep_run import (  # noqa: F401
    SweepEvent,
    SweepReport,
    _lock,
    _pool_context,
    _record,
    _remove_stale_temps,
    _run_dask,
    _run_local,
    _sigterm_interrupts,
    _stop_workers,
    _write_manifest,
    read_manifest,
    run_sweep,
)
from neuroinit.experiments.sweep_spec import (  # noqa: F401
    SweepSpec,
    _as_list,
    _fail,
    _gains,
    _is_num,
    _resolve_profile,
    _seeds,
    load_spec,
    parse_spec,
)
from neuroinit.experiments.sweep_summary import (  # noqa: F401
    BestChoice,
    RunSummary,
    _check_select,
    _fmt_value,
    _mean_sem,
    _score,
    edge_mark,
    format_summary,
    learned_at,
    select_best,
    summaries_from_dir,
    summarize,
)
from neuroinit.experiments.sweep_worker import (  # noqa: F401
    _exit_with,
    _file_summary,
    _init_worker,
    _is_shared,
    _pid_alive,
    execute_run,
    run_state,
)

__all__ = [
    "ADDED_FIELDS",
    "AXES",
    "FLOSS_SUFFIX",
    "MANIFEST",
    "RUNS_DIR",
    "SELECT",
    "STATUSES",
    "BestChoice",
    "PlannedRun",
    "RunSummary",
    "SpecError",
    "SweepError",
    "SweepEvent",
    "SweepReport",
    "SweepSpec",
    "comparable_config",
    "condition_key",
    "edge_mark",
    "execute_run",
    "format_summary",
    "learned_at",
    "load_spec",
    "parse_spec",
    "read_manifest",
    "rule_label",
    "run_id",
    "run_state",
    "run_sweep",
    "select_best",
    "summaries_from_dir",
    "summarize",
]
