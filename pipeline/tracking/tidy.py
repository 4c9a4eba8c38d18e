"""Tidying after a `log` that was cut off (``kill -9``, a server that went away): one pipeline run is
one parent run, logged in full or not at all.

Every run the `log` stage opens carries the tag ``pipeline.logging = <fingerprint>`` (``LOGGING``)
while it is logged; the parent gets ``pipeline.fingerprint`` (``FINGERPRINT``) last, then the first
tag is removed from every run of the attempt (``untag``). The next ``log`` or ``sync`` of the same
pipeline run finds what an interrupted attempt left (``tidy``): runs with the first tag and no
complete parent are marked FAILED and deleted (``mlflow gc`` purges them) before the run is logged
in full; a complete parent killed before it was closed is marked FINISHED."""

FINGERPRINT, LOGGING = "pipeline.fingerprint", "pipeline.logging"  # tags: complete run; run being logged


def untag(client, experiment_id: str, fp: str) -> None:
    """Remove LOGGING from the runs of a complete attempt: FINGERPRINT on the parent says it all."""
    for run in client.search_runs([experiment_id], filter_string=f"tags.`{LOGGING}` = '{fp}'", max_results=10000):
        client.delete_tag(run.info.run_id, LOGGING)


def tidy(client, experiment_id: str, fp: str):
    """Finish what an interrupted ``log`` of run ``fp`` left behind: a complete parent (it has
    its fingerprint) still RUNNING, and its children, are marked FINISHED; the runs of an
    incomplete attempt are marked FAILED and deleted. Returns the complete parent or None."""
    def search(key: str, value: str) -> list:
        return client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=10000)

    complete = search(FINGERPRINT, fp)
    keep = complete[0] if complete else None
    if keep is not None:
        for run in [keep, *search("mlflow.parentRunId", keep.info.run_id)]:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "FINISHED")
    for run in search(LOGGING, fp):  # every attempt's parent and children
        if keep is not None and keep.info.run_id in (run.info.run_id, run.data.tags.get("mlflow.parentRunId")):
            continue
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(run.info.run_id, "FAILED")
        client.set_tag(run.info.run_id, "pipeline.aborted", "cut off while logging; the run was logged again in full")
        client.delete_run(run.info.run_id)
    return keep
