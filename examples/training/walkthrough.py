# %% [markdown]
# # From history to training set, in Python
#
# The notebook version of this folder's README: the same pipeline file, run
# from Python with the `sluice` package (`pip install ./python`). Each `# %%`
# is a cell (VS Code, Jupyter's jupytext and Spyder open it as a notebook);
# `python examples/training/walkthrough.py` runs it top to bottom.
#
# `SLUICE_WALKTHROUGH_DIR` picks the working folder (default: a new temporary
# one); the lake goes to `$SLUICE_LAKE`, by default `lake/` in that folder.

# %%
import datetime as dt
import os
import random
import tempfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import sluice

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.environ.get("SLUICE_WALKTHROUGH_DIR") or tempfile.mkdtemp(prefix="sluice-walkthrough-")
os.environ.setdefault("SLUICE_LAKE", os.path.join(WORK, "lake"))
EVENTS = int(os.environ.get("SLUICE_WALKTHROUGH_EVENTS", "50000"))

# %% [markdown]
# ## History
# Three hours of clicks by 200 users on 50 items, in time order except a few
# events that arrive too late for their window (streaming drops them, and so
# do the backfill and the training set).

# %%
rng = random.Random(7)
start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
step = 3 * 3600 * 1000 // EVENTS
times, users, items, prices = [], [], [], []
for i in range(EVENTS):
    t = i * step
    if i % 1000 == 999:
        t -= 600_000  # ten minutes behind the stream: late
    times.append(start + dt.timedelta(milliseconds=max(t, 0)))
    users.append(f"u{rng.randrange(1, 201):05d}")
    items.append(f"i{rng.randrange(1, 51)}")
    prices.append(None if i % 97 == 0 else round(rng.uniform(1, 100), 2))
history = pa.table(
    {
        "user_id": users,
        "item_id": items,
        "price": pa.array(prices, pa.float64()),
        "ts": pa.array(times, pa.timestamp("ms", "UTC")),
    }
)
history_dir = os.path.join(WORK, "history", "date=2024-01-01")
os.makedirs(history_dir, exist_ok=True)
pq.write_table(history, os.path.join(history_dir, "events.parquet"))
history.num_rows

# %% [markdown]
# ## The pipeline
# Planning checks the whole file; a mistake raises `sluice.PipelineError`
# with its file, line, column and hint.

# %%
pipeline = sluice.Pipeline(os.path.join(HERE, "pipeline.sql"))
for v in pipeline.views:
    print(f"{v.name}: {v.kind}, key {v.keys}, features {v.features}")
print(pipeline.explain())

# %% [markdown]
# ## Backfill into the lake and the online store

# %%
state_dir = os.path.join(WORK, "state")
report = pipeline.backfill(
    sources={"clicks": os.path.join(WORK, "history")},
    state_dir=state_dir,
    online=True,
    replace=True,
)
print(f"{report['events']} events, {report['late']} late, {report['seconds']:.2f} s")

# %%
lake = pipeline.read_lake("user_activity", start="2024-01-01T01:00:00Z", end="2024-01-01T02:00:00Z")
lake.to_pandas().describe()

# %% [markdown]
# ## A training set
# Labelled examples (the spine) with each view's features as an online read
# at the example's time would have returned them: the history is replayed
# through the same tiles as the stream.

# %%
spine = pd.read_csv(os.path.join(HERE, "spine.csv"))
spine["ts"] = pd.to_datetime(spine["ts"], utc=True, format="ISO8601")
training = pipeline.training_set(
    spine,
    features=["user_activity", "item_popularity:clicks_30m"],
    key_map={"user_id": "uid"},
    time_column="ts",
    sources={"clicks": os.path.join(WORK, "history")},
    dead_letters=os.path.join(WORK, "training.dead_letters.jsonl"),
)
training_df = training.to_pandas()
training_df

# %% [markdown]
# ## What the model is served
# The online store the backfill seeded, read without a server (a running
# `sluice run --serve` answers the same through `sluice.Client`).

# %%
served = sluice.open_state(state_dir).get("user_activity", ["u00001", "u00002", "u99999"])
served.to_pandas()
