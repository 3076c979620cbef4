"""Reads back the offline W&B runs under a workdir, with wandb's own record reader."""

import json
import pathlib


def offline_runs(workdir: pathlib.Path) -> list[dict]:
  """Each offline run under WORKDIR/wandb: its id, name, tags and history rows by step."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  from wandb.sdk.internal import datastore  # pylint: disable=g-import-not-at-top

  runs = []
  for path in sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb")):
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    run = {"history": {}}
    while (data := store.scan_data()) is not None:
      record = wandb_internal_pb2.Record()
      record.ParseFromString(data)
      kind = record.WhichOneof("record_type")
      if kind == "run":
        run.update(id=record.run.run_id, project=record.run.project,
                   name=record.run.display_name, tags=list(record.run.tags))
      elif kind == "history":
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                 for i in record.history.item}
        run["history"][items["_step"]] = {k: v for k, v in items.items()
                                          if not k.startswith("_")}
    runs.append(run)
  return runs


def by_step(records: list[dict]) -> dict[int, dict]:
  out: dict[int, dict] = {}
  for r in records:
    out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step"})
  return out
