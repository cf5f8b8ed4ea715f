"""The batch loop: submit by free capacity, follow, collect images and sidecars, retry lost jobs, resume."""

from __future__ import annotations

import json
import os
import queue
import sys
import time
import uuid

from ...pipelines.errors import Flux2KitError
from ..comfy_client import Refused, Unreachable, history_error, output_items, prompt_errors
from ..terminal import say
from .manifest import Manifest
from .records import AttemptState, Job, JobRecord, JobState
from .targets import LOCAL, Local, Server

POLL_SECONDS = 0.5
DOWN_AFTER_SECONDS = 3.0  # a server failing every request for this long is given up on
# A prompt id recorded as "submitting" that the server does not know yet is only taken as never sent once
# this long has passed since the record: a slow server may still be handling a POST that timed out here.
ARRIVAL_GRACE_SECONDS = 30.0



class Batch:
    """Dispatches the jobs to the targets, follows them, collects their images; resumes from the manifest."""

    def __init__(self, jobs: list[Job], out_dir: str, servers: list[str], local_runner=None, *, per_server: int = 2,
                 retries: int = 2, json_events: bool = False, retry_failed: bool = False, log=say, workflow_name=""):
        self.jobs = {j.index: j for j in jobs}
        self.out_dir = os.path.abspath(out_dir)
        self.manifest = Manifest(self.out_dir)  # first: it refuses a folder another batch command is using
        self.retries, self.json_events, self.log = retries, json_events, log
        self.workflow_name = workflow_name
        self.wake: queue.Queue = queue.Queue()
        self.servers = {s.url: s for s in (Server(u, per_server, self.wake) for u in servers)}
        self.local = Local(local_runner, self.wake) if local_runner is not None else None
        for leftover in os.listdir(self.out_dir):  # half-written files of a run that was killed
            if leftover.endswith(".tmp"):
                os.remove(os.path.join(self.out_dir, leftover))
        self.records: dict[int, JobRecord] = {}  # this run's jobs, as the manifest has them
        self.started = time.monotonic()
        self.done_now = self.images_now = 0
        self._last_progress, self._last_line = 0.0, None
        try:
            self._sync(retry_failed)
        except BaseException:
            self.manifest.close()
            if self.local is not None:
                self.local.stop()
            raise

    # -- manifest

    def _sync(self, retry_failed: bool) -> None:
        """Add new jobs; refuse a folder that holds another batch; re-attach what was in flight."""
        self.batch_id = self.manifest.batch_id(self.workflow_name)
        known = self.manifest.records()
        for index, job in self.jobs.items():
            old = known.get(index)
            if old is not None and old.fingerprint != job.fingerprint():
                raise Flux2KitError(f"{self.out_dir} holds a batch whose job {index} ({old.name}) had other "
                                    f"inputs than now ({job.name}). Resume with the same workflow, inputs, --sweep "
                                    f"and --set, or use another --out folder for a new batch.")
        self.manifest.add_jobs([job for index, job in self.jobs.items() if index not in known])
        known = self.manifest.records()
        self.records = {index: known[index] for index in self.jobs}
        if retry_failed:
            self.manifest.retry_failed(self.records.values())
        resumed = 0
        for index, record in self.records.items():
            if not record.state.in_flight:
                continue
            resumed += 1
            if record.target == LOCAL or not record.prompt_id:
                self.manifest.set_state(record, JobState.PENDING)  # an in-process run died with the command
                continue
            server = self.servers.get(record.target)
            if server is None:  # submitted in an earlier run to a server not listed now: still follow it there
                server = self.servers[record.target] = Server(record.target, 0, self.wake, submit=False)
            server.inflight[record.prompt_id] = index
        done = self._count(JobState.DONE)
        if resumed or done:
            self.log(f"Resuming {self.manifest.path}: {done} done, {resumed} to look up on their servers.")

    def _count(self, state: JobState) -> int:
        return sum(r.state is state for r in self.records.values())

    def _queued(self, record: JobRecord, prompt_id: str | None = None) -> None:
        """A server has the job's prompt: one more attempt (and the attempt ``prompt_id`` marked queued)."""
        self.manifest.set_state(record, JobState.QUEUED, attempts=record.attempts + 1)
        if prompt_id:
            self.manifest.attempt(prompt_id, AttemptState.QUEUED)

    def _event(self, **event) -> None:
        if self.json_events:
            print(json.dumps(event, default=str), flush=True)

    # -- the loop

    def run(self) -> dict:
        """Run every job to done or failed (waiting while every server is down); returns the summary."""
        try:
            self._run_until_finished()
            return self._summary()
        finally:
            self.manifest.close()  # frees the folder, also when stopped (Ctrl-C) or failing

    def _run_until_finished(self) -> None:
        for server in self.servers.values():
            server.watch()
        try:
            while True:
                self._poll_servers()
                self._poll_local()
                self._dispatch()
                self._progress()
                if all(r.state.finished for r in self.records.values()):
                    break
                if not self._usable() and self._count(JobState.PENDING):
                    self._wait_for_a_server()
                try:
                    self.wake.get(timeout=POLL_SECONDS)
                    while True:  # drain: one poll answers them all
                        self.wake.get_nowait()
                except queue.Empty:
                    pass
        finally:
            for server in self.servers.values():
                server.stop()
            if self.local is not None:
                self.local.stop()

    def _usable(self) -> bool:
        return (self.local is not None) or any(s.alive and s.submit for s in self.servers.values())

    def _wait_for_a_server(self) -> None:
        """Every server is down: fail nothing yet, keep asking (the jobs resume where they stopped)."""
        self._progress(force=True, note="every server is down; waiting for one to come back (Ctrl-C stops)")
        time.sleep(POLL_SECONDS * 4)

    def _poll_servers(self) -> None:
        for server in list(self.servers.values()):
            if not server.inflight and not server.submit:
                continue
            try:
                running, pending = server.client.queue()
            except (Unreachable, Refused, ValueError) as e:
                self._failing(server, e)
                continue
            if not server.alive:
                self._revived(server)
            server.failing_since = None
            server.busy, server.running = len(running) + len(pending), running
            for prompt_id, index in list(server.inflight.items()):
                record = self.records[index]
                if prompt_id in running or prompt_id in pending:
                    if record.state is JobState.SUBMITTING:  # the POST got there before the last stop
                        self._queued(record, prompt_id)
                    continue
                try:
                    entry = server.client.history(prompt_id)
                except (Unreachable, Refused, ValueError) as e:
                    self._failing(server, e)
                    break
                if entry is None:
                    if record.state is JobState.SUBMITTING and \
                            time.time() - (record.submitted or 0) < ARRIVAL_GRACE_SECONDS:
                        continue  # its POST may still be on its way (timed out here, the server slow): look again
                    del server.inflight[prompt_id]
                    if record.state is JobState.SUBMITTING:  # never arrived: submit it again, a new id
                        self.manifest.attempt(prompt_id, AttemptState.NEVER_ARRIVED)
                        self.manifest.set_state(record, JobState.PENDING)
                    else:
                        self._lost(index, prompt_id, f"{server.url} no longer knows prompt {prompt_id} (restarted?)")
                    continue
                status = entry.get("status") or {}
                if record.state is JobState.SUBMITTING:  # it got there and ran before the last stop
                    self._queued(record)
                failure = history_error(entry, prompt_id)
                if failure:
                    del server.inflight[prompt_id]
                    self._fail(index, prompt_id, failure)
                    continue
                if not status and not entry.get("outputs"):
                    continue  # being written
                del server.inflight[prompt_id]
                self._collect(server, index, prompt_id, entry)

    def _failing(self, server: Server, error) -> None:
        now = time.monotonic()
        if server.failing_since is None:
            server.failing_since = now
        if server.alive and now - server.failing_since >= DOWN_AFTER_SECONDS:
            server.alive = False
            self.log(f"\n{server.url} stopped answering ({error}); its {len(server.inflight)} job(s) go elsewhere.")
            self._event(event="server", url=server.url, state="down", reason=str(error))
            for prompt_id, index in list(server.inflight.items()):
                del server.inflight[prompt_id]
                record = self.records[index]
                if record.state is JobState.SUBMITTING:
                    self.manifest.attempt(prompt_id, AttemptState.ABANDONED, f"{server.url} stopped answering")
                    self.manifest.set_state(record, JobState.PENDING)
                else:
                    self._lost(index, prompt_id, f"{server.url} stopped answering during the job ({error})")

    def _revived(self, server: Server) -> None:
        """A server answers again: drop from its queue the prompts we gave to others meanwhile."""
        server.alive, server.uploads = True, {}  # a restarted server may have lost its input folder
        self.log(f"\n{server.url} answers again.")
        self._event(event="server", url=server.url, state="up")
        stale = self.manifest.stale_prompts(server.url)
        if stale:
            try:
                server.client.delete_from_queue(stale)
            except (Unreachable, Refused, ValueError):
                pass

    def _lost(self, index: int, prompt_id: str, reason: str) -> None:
        """A job a server accepted and then lost: again elsewhere, or failed after --retries."""
        self.manifest.attempt(prompt_id, AttemptState.LOST, reason)
        record = self.records[index]
        if record.attempts > self.retries:
            self.manifest.set_state(record, JobState.FAILED, error=f"{reason}; given up after {record.attempts} "
                                                                   f"attempts (--retries {self.retries})",
                                    finished=time.time())
            self._event(event="job", state="failed", job=index, name=record.name, error=reason)
            return
        self.manifest.set_state(record, JobState.PENDING)
        self._event(event="job", state="retry", job=index, name=record.name, reason=reason)

    def _fail(self, index: int, prompt_id: str | None, reason: str) -> None:
        if prompt_id:
            self.manifest.attempt(prompt_id, AttemptState.FAILED, reason)
        record = self.records[index]
        self.manifest.set_state(record, JobState.FAILED, error=reason, finished=time.time())
        self.log(f"\njob {record.name} failed: {reason}")
        self._event(event="job", state="failed", job=index, name=record.name, error=reason)

    def _dispatch(self) -> None:
        pending = sorted(i for i, r in self.records.items() if r.state is JobState.PENDING)
        for index in pending:
            target = self._choose()
            if target is None:
                return
            if target is self.local:
                self._submit_local(index)
            else:
                self._submit(target, index)

    def _choose(self):
        if self.local is not None and self.local.current is None:
            return self.local
        free = [(s.per_server - s.busy, -s.assigned, s) for s in self.servers.values()
                if s.alive and s.submit and s.per_server - s.busy > 0]
        if not free:
            return None
        return max(free, key=lambda t: t[:2])[2]

    def _submit(self, server: Server, index: int) -> None:
        job, record = self.jobs[index], self.records[index]
        prompt_id = str(uuid.uuid4())
        # Recorded before the POST: a stop between the two leaves an id to look up, never a duplicate.
        self.manifest.record_submission(record, prompt_id, server.url, time.time())
        server.inflight[prompt_id] = index
        server.busy += 1
        server.assigned += 1
        try:
            workflow = json.loads(json.dumps(job.workflow))
            for key, path in job.images.items():
                nid, _, name = key.partition(".")
                workflow[nid]["inputs"][name] = server.upload(path)
            server.client.queue_prompt(workflow, prompt_id=prompt_id, extra_data={
                "flux2kit_batch": {"batch": self.batch_id, "job": index, "name": job.name}})
        except Refused as e:
            del server.inflight[prompt_id]
            message = prompt_errors(job.workflow, e.body, e.code) if e.code == 400 else str(e)
            self._fail(index, prompt_id, message)
            return
        except OSError as e:  # a reference image gone or unreadable here (HTTP trouble is Unreachable): not the server
            del server.inflight[prompt_id]
            self._fail(index, prompt_id, f"cannot read {e.filename or 'a reference image'}: {e.strerror or e}")
            return
        except (Unreachable, ValueError) as e:
            self._failing(server, e)  # the poll finds out whether it got there
            return
        self._queued(record, prompt_id)
        self._event(event="job", state="submitted", job=index, name=job.name, target=server.url,
                    prompt_id=prompt_id)

    def _submit_local(self, index: int) -> None:
        record = self.records[index]
        self.manifest.set_state(record, JobState.RUNNING, target=LOCAL, prompt_id=None, attempts=record.attempts + 1,
                                submitted=time.time())
        self.local.current = index
        self.local.assigned += 1
        self._event(event="job", state="submitted", job=index, name=self.jobs[index].name, target=LOCAL)
        self.local.jobs.put((index, self.jobs[index].workflow))

    def _poll_local(self) -> None:
        if self.local is None:
            return
        while True:
            try:
                index, state, result = self.local.results.get_nowait()
            except queue.Empty:
                return
            self.local.current = None
            if state == "failed":
                self._fail(index, None, result)
                continue
            outputs = []
            for k, path in enumerate(result):
                with open(path, "rb") as f:
                    data = f.read()
                outputs.append(self._write_output(index, k, len(result), os.path.splitext(path)[1], data, None))
                os.remove(path)
            self._finish(index, None, outputs)

    # -- outputs

    def _collect(self, server: Server, index: int, prompt_id: str, entry: dict) -> None:
        items = output_items(entry)
        if not items:
            self._fail(index, prompt_id, "the workflow ran but saved no images (is its output a Save Image node?)")
            return
        outputs = []
        for k, item in enumerate(items):
            try:
                data = server.client.view(item)
            except Refused as e:
                if 400 <= e.code < 500:  # the server answers but has no such image: asking again never ends
                    self._lost(index, prompt_id, f"{server.url} cannot give image {item.get('filename')!r} of prompt "
                                                 f"{prompt_id} ({e})")
                    return
                server.inflight[prompt_id] = index
                self.log(f"\ncannot fetch {item.get('filename')} of job {index} from {server.url} yet: {e}")
                return
            except Unreachable as e:
                server.inflight[prompt_id] = index  # try again at the next poll (or elsewhere if the server is gone)
                self.log(f"\ncannot fetch {item.get('filename')} of job {index} from {server.url} yet: {e}")
                return
            outputs.append(self._write_output(index, k, len(items), os.path.splitext(item["filename"])[1], data,
                                              {"target": server.url, "prompt_id": prompt_id}))
        self.manifest.attempt(prompt_id, AttemptState.DONE)
        self._finish(index, prompt_id, outputs)

    def _write_output(self, index: int, k: int, count: int, ext: str, data: bytes, origin: dict | None) -> str:
        job = self.jobs[index]
        stem = job.name + (f"-{k + 1}" if count > 1 else "")
        path = os.path.join(self.out_dir, stem + (ext or ".png"))
        _atomic_write(path, data)
        sidecar = {"name": job.name, "job": index, "row": job.row, "image": os.path.basename(path),
                   "image_index": k, "workflow": self.workflow_name, "values": job.values, **job.meta,
                   "set": job.assigned, "target": (origin or {}).get("target", LOCAL),
                   "prompt_id": (origin or {}).get("prompt_id"), "batch": self.batch_id,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(os.path.join(self.out_dir, stem + ".json"),
                      json.dumps(sidecar, indent=2, ensure_ascii=False, default=str).encode())
        return path

    def _finish(self, index: int, prompt_id: str | None, outputs: list[str]) -> None:
        record = self.records[index]
        self.manifest.set_state(record, JobState.DONE, outputs=outputs, finished=time.time(), error=None)
        self.done_now += 1
        self.images_now += len(outputs)
        self._event(event="job", state="done", job=index, name=record.name, target=record.target,
                    prompt_id=prompt_id, outputs=outputs)

    # -- reporting

    def counts(self) -> dict:
        c = {"done": 0, "failed": 0, "running": 0, "waiting": 0}
        for record in self.records.values():
            key = {JobState.DONE: "done", JobState.FAILED: "failed", JobState.PENDING: "waiting"}.get(record.state,
                                                                                                     "running")
            c[key] += 1
        return c

    def _progress(self, force: bool = False, note: str = "") -> None:
        now = time.monotonic()
        c = self.counts()
        elapsed = now - self.started
        rate = self.done_now / elapsed * 60 if elapsed > 0 and self.done_now else 0.0
        left = c["waiting"] + c["running"]
        eta = f"ETA {_duration(left / rate * 60)}" if rate else "ETA ?"
        line = (f"batch: {c['done']}/{len(self.records)} done, {c['failed']} failed, {c['running']} running, "
                f"{c['waiting']} waiting | {rate:.1f} jobs/min | {eta}" + (f" | {note}" if note else ""))
        key = (c["done"], c["failed"], c["running"], c["waiting"], note)
        if not force and (key == self._last_line or now - self._last_progress < 1.0) and left:
            return
        self._last_line, self._last_progress = key, now
        if sys.stderr.isatty() and self.log is say:
            sys.stderr.write("\r\x1b[K" + line)
            sys.stderr.flush()
        else:
            self.log(line)
        self._event(event="progress", **c, jobs_per_minute=round(rate, 2),
                    eta_seconds=round(left / rate * 60) if rate else None)

    def _summary(self) -> dict:
        c = self.counts()
        elapsed = time.monotonic() - self.started
        per_target = self.manifest.done_per_target()
        local_done = sum(1 for r in self.records.values() if r.state is JobState.DONE and r.target == LOCAL)
        if local_done:
            per_target[LOCAL] = local_done
        summary = {"done": c["done"], "failed": c["failed"], "jobs": len(self.records), "seconds": round(elapsed, 2),
                   "done_this_run": self.done_now,
                   "images_this_run": self.images_now,
                   "images_per_minute": round(self.images_now / elapsed * 60, 2) if elapsed > 0 else 0.0,
                   "per_target": per_target, "manifest": self.manifest.path,
                   "failures": {r.name: r.error for r in self.records.values() if r.state is JobState.FAILED}}
        _atomic_write(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=2).encode())
        if sys.stderr.isatty() and self.log is say:
            sys.stderr.write("\n")
        self.log(f"Done: {summary['done']} of {summary['jobs']} jobs, {summary['failed']} failed, in "
                 f"{_duration(elapsed)} ({summary['images_per_minute']} images/min this run). Images in "
                 f"{self.out_dir}.")
        self._event(event="summary", **summary)
        return summary



def _atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: a reader (or a resumed batch) never sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
