"""
What keeps a long run safe, whatever ends it: train.py's stages, prepare_data.py's corpus and its LLaVA import, an
export of weights. None of it is the paper's; it is what a run of hours on shared machines needs so that Ctrl-C, a
SIGTERM, a full disk, a second run into the same folder or a killed torchrun process never costs the work done.

    stopping         SIGTERM ends a run as Ctrl-C does (Terminated, sigterm_stops); a folder swap is never cut in
                     half (uninterrupted); pool workers leave the answering to their parent (quiet_worker); a file
                     the user may not read ends a run in a line that names it (denied); a stage's DataLoader workers,
                     killed or stopped with it, end without a traceback (dead_worker, let_go_of_workers)
    whole files      each file of a training run (checkpoints, metrics, the loss plot), of rows, and of safetensors is
                     written to FILE.tmpPID, synced, then renamed over FILE (atomic_write): a reader or a resume sees
                     the old file or the new one, never half of one (atomic_save, for checkpoints)
    one run a folder a corpus build holds its folder's lock (building), a training run its --out's (lock_out_folder)
    processes        torchrun's processes stop together, at the same step, and leave the group without a traceback
                     (first_failure, end_process_group)
    exact resume     the random number generators' state, saved in every checkpoint (rng_state)
"""

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------------------------------
# Stopping

class Terminated(KeyboardInterrupt):
    """SIGTERM: what kill sends by default, a cluster taking its machines back, torchrun stopping the other processes
    when one fails. Raised in the main process (sigterm_stops), it ends a run as Ctrl-C does: in train.py a checkpoint
    being written is abandoned (atomic_save removes its temporary file), and the last whole one is kept for --resume;
    a corpus being built is left aside, as it was. A KeyboardInterrupt, so that a forked DataLoader worker, which a
    signal to the process group reaches too, exits quietly. Python runs the handler between bytecodes: a process
    blocked in a collective that waits for one that failed gets it only when the collective returns, or is killed by
    torchrun after its grace period."""


def raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_stops():
    """While it runs, SIGTERM raises Terminated, unless whatever started us set a handler of its own or ignores it
    (or a sigterm_stops outside this one did: that one restores it). Left to its default, a SIGTERM killed a run
    without a word, and the pool workers that made a corpus printed a traceback each as their parent vanished. Only
    the main thread may set a handler: called from another, nothing changes."""
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def uninterrupted():
    """Ctrl-C and SIGTERM held back for the moment of a swap of folders (prepare_data.py's corpus, an export), so that
    it always completes: never the old folder gone and the new one still under its temporary name (a SIGTERM there
    left an export only as .partial, which the next export then cleared). A signal that came meanwhile is delivered
    once the swap has completed, to the handlers of before (SIGTERM if both came: either means stop); a swap that
    failed raises its own error instead. (Signals are the main thread's: called from another, nothing changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    before = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        # Each handler is put back even if a signal lands meanwhile: signal.signal runs the handlers of signals
        # pending (a Ctrl-C just after SIGINT's is back raises there), which would leave the other one holding.
        came = None
        for s, handler in before.items():
            while True:
                try:
                    signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # (None: set outside Python)
                    break
                except KeyboardInterrupt as e:  # (Ctrl-C, or Terminated: raised once every handler is back)
                    came = came or e
        if came is not None:
            raise came
    if held:  # (only here, after a swap that completed)
        os.kill(os.getpid(), signal.SIGTERM if signal.SIGTERM in held else signal.SIGINT)


def quiet_worker():
    """A pool worker's initializer: Ctrl-C reaches every process of the terminal, and the parent alone answers it
    (with a line, not one traceback per worker); leaving the pool's `with` stops the workers, with a SIGTERM, which
    ends each at once (its default, not the parent's Terminated: sigterm_stops)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def denied(e: PermissionError, doing: str = "read") -> str:
    """A file this user may not read (another user's checkpoint, tokenizer or rows), or a folder it may not write, as
    the one line a script ends with instead of a traceback: sample.py, train.py, the export, the data readers."""
    if e.filename is None:  # (not a file's: say what the system said)
        return str(e)
    return f"cannot {doing} {e.filename}: {e.strerror} (the user running this may not {doing} it)"


def dead_worker(e: BaseException) -> bool:
    """A DataLoader worker process that died (torch raises this RuntimeError wherever the main process is when it
    learns of it): not a bug of the run, and no failed write."""
    return isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker")


def let_go_of_workers(e: BaseException):
    """Shut the stopped stage's data workers down now, through the frames of e's traceback, which hold the loader.
    A SIGTERM reaches the whole process group, so the workers die of it too, and torch's SIGCHLD handler raises for a
    worker killed by a signal: left to Python's tidying up at exit, the loader's shutdown printed that as a traceback
    ("Exception ignored in ... DataLoader worker ... is killed by signal: Terminated") after the run's one line, in 3
    of 4 runs of stage 0 with 2 workers killed so. Here it is expected, and not printed."""
    def hook(unraisable):
        if not dead_worker(unraisable.exc_value):
            previous(unraisable)

    previous, sys.unraisablehook = sys.unraisablehook, hook
    try:
        traceback.clear_frames(e.__traceback__)  # (their locals: the loader's iterator, whose __del__ shuts it down)
    finally:
        sys.unraisablehook = previous


# ---------------------------------------------------------------------------------------------------------------------
# Whole files

LEFTOVER = re.compile(r".*\.tmp\d+")  # the temporary file of an atomic_write (FILE.tmpPID) whose process was killed


def atomic_write(path: str, write):
    """Call write(f) on a new binary file, PATH.tmpPID, synced to disk, then rename it over path. A rename within a
    folder is atomic on POSIX file systems, so a killed process (or a power cut) leaves the old file or the new one,
    never half of one; a write that fails (a full disk, a row that cannot be encoded) removes its temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename points the name at it, or a power cut could empty it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class WriteFailed(Exception):
    """A file of the run could not be written (a full disk, a file-size limit): main says so in one line, with the
    checkpoint that is kept."""


@contextlib.contextmanager
def writing(path: str):
    """Around a write of path: an OSError (or torch.save's RuntimeError, which is what a file-size limit gives)
    becomes WriteFailed naming the file."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if dead_worker(e):  # reported wherever the run is: it may be here, and is no failed write
            raise
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C or a SIGTERM (Terminated) while torch.save wrote:
            raise e.__context__ from None  # its writer turns that into "unexpected pos": a stop, not a failed write
        reason = getattr(e, "strerror", None) or str(e)
        if not isinstance(e, OSError):  # torch.save's own words for a full disk ("unexpected pos 4190016 vs ...")
            with contextlib.suppress(OSError):
                reason += f" ({shutil.disk_usage(os.path.dirname(path) or '.').free / 2 ** 20:.0f} MB free there)"
        raise WriteFailed(f"cannot write {path}: {reason}") from None


def atomic_save(obj, path: str):
    """torch.save(obj) (or, for a str, the text) to path, whole or not at all (atomic_write); a write that fails
    raises WriteFailed."""
    with writing(path):
        atomic_write(path, lambda f: f.write(obj.encode("utf-8")) if isinstance(obj, str) else torch.save(obj, f))


def remove_stale_temporaries(folder: str):
    """Delete the temporary files (FILE.tmpPID) that atomic_write left when its process was killed while writing; one
    whose process is still running is a write in progress, and stays."""
    try:
        names = os.listdir(folder)
    except OSError:  # (a stage folder not made yet holds none; one that cannot be read: run_stage's checks say so)
        return
    for tmp in [os.path.join(folder, name) for name in names if LEFTOVER.fullmatch(name)]:
        try:
            os.kill(int(tmp.rsplit(".tmp", 1)[1]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            with contextlib.suppress(OSError):  # (a folder that may not be written: run_stage's check says so)
                os.remove(tmp)
        except (PermissionError, OverflowError):  # another user's live process; a number no process can have
            pass


# ---------------------------------------------------------------------------------------------------------------------
# One run a folder

def sign_lock(f):
    """Write into a lock file just taken who holds it, "HOST PID", for another run that finds it held to name."""
    f.truncate(0)
    f.write(f"{socket.gethostname()} {os.getpid()}\n")
    f.flush()


def lock_holder(f) -> str:
    """Who holds the lock file f, as sign_lock wrote it: " (process PID on HOST)", or "" when it says nothing."""
    f.seek(0)
    holder = f.read().split()
    return f" (process {holder[-1]}{f' on {holder[0]}' if len(holder) == 2 else ''})" if holder else ""


@contextlib.contextmanager
def building(folder: str):
    """Hold folder's build lock while a corpus is made aside and swapped in (prepare_data.py's, or a LLaVA import).
    Two builds of one folder at once cleared each other's .partial, and left a folder of one's rows and the other's
    images, whose meta.json named one of them (a review found 896 of 1,164 images the other run's). A second build
    waits for the first, then finds the folder as the first left it (two train.py runs making a missing data/ then
    train on one corpus). The lock is a hidden file beside the folder, .NAME.lock, removed when the build ends;
    where the system or the file system has no such locks (Windows; Lustre or NFS mounted without them), nothing is
    held."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = os.path.abspath(folder)  # (however it is spelt: "data", "data/", "./data/.")
    os.makedirs(os.path.dirname(folder), exist_ok=True)  # (as the build's own folder would make it)
    path = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.lock")
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another build of {folder} to end{lock_holder(f)}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)  # (Ctrl-C while waiting: KeyboardInterrupt, as anywhere)
        except OSError:  # a file system without locks (ENOSYS, ENOLCK): the build goes on unlocked
            f.close()
            with contextlib.suppress(OSError):
                os.remove(path)
            f = None
            break
        try:  # the holder removes the file as it ends: a lock on that one, gone, holds nothing
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    if f is None:
        yield
        return
    try:
        sign_lock(f)
        yield
    finally:
        os.remove(path)  # (before letting go: a build waiting on this file then sees it is gone, and opens anew)
        f.close()


OUT_LOCKS = {}  # --out folder -> its open .lock file, held by this run (released when main returns)


def lock_out_folder(out: str, hold: bool = True):
    """Hold a lock on OUT/.lock until the run ends: two runs into one folder would each see no checkpoint of the
    other's until the first one is saved, then write over each other's stages (a chain of stages from two runs,
    which nothing would notice). Taken when the first stage folder is made, so that a run refused earlier leaves
    nothing behind; hold=False only asks, before the run's checks, and makes nothing (a folder a live run writes to
    would otherwise be refused as an earlier run's, with advice to --resume it). The system drops the lock when the
    process ends, however it ends: a killed run leaves nothing to clean up. Where the folder cannot be written (the
    stage folder's own check says so) or the system has no such locks (Windows; some network file systems), nothing
    is held. -> why the run must stop: another run holds the lock ("" when it may go on)."""
    if out in OUT_LOCKS or not (hold or os.path.exists(os.path.join(out, ".lock"))):
        return ""
    try:
        import fcntl
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
    except IsADirectoryError:  # (passed over, two runs into the folder would both go on)
        return f"{os.path.join(out, '.lock')} is a folder, where runs into {out} keep their lock file: remove it"
    except (ImportError, OSError):
        return ""
    for attempt in range(10):  # (another run's look before its checks holds the lock for an instant: wait it out)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt < 9:
                time.sleep(0.01)
                continue
            who = lock_holder(f)
            f.close()
            return f"another run{who} is writing to {out}: wait for it to end, or choose another --out"
        except OSError:  # a file system without locks
            f.close()
            return ""
    if not hold:
        f.close()  # (which lets go of the lock)
        return ""
    sign_lock(f)
    OUT_LOCKS[out] = f
    return ""


def claim_out_folder(out: str, first: bool, world: int, hold: bool = True):
    """lock_out_folder on the first process (torchrun's, which holds the lock for all), its answer given to every
    process (first_failure), so that all stop together when another run holds the folder."""
    busy = first_failure(lock_out_folder(out, hold) if first else "", world)
    if busy:
        raise SystemExit(busy)


def close_inherited_locks(worker_id: int):
    """DataLoader's worker_init_fn (hence the worker_id it passes, unused): a forked data worker's first act: close
    its copies of the run's lock files. A lock belongs to the open file, which the worker shares until it closes its
    copy (the run's own stays locked): a run killed with kill -9 then lets go of its --out at once, where its workers
    held it until they noticed (seconds), and a --resume at once was refused as "another run is writing", naming the
    dead process."""
    for f in OUT_LOCKS.values():
        f.close()


def unlock_out_folders():
    """Let go of every --out this run holds (main, as the run ends however it ends)."""
    for f in OUT_LOCKS.values():
        f.close()
    OUT_LOCKS.clear()


# ---------------------------------------------------------------------------------------------------------------------
# torchrun's processes

def setup_distributed():
    """(rank, world) from torchrun's environment, or (0, 1) for a single process; each process then uses the GPU of
    its LOCAL_RANK, if there are GPUs."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        # NCCL for tensors on the GPU, gloo for those on the CPU: the few bytes each step that say whether every
        # process could read its batch (first_failure), asked over NCCL, would wait for the GPU to finish the step
        # before; and --device cpu trains over gloo on a machine with GPUs.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return rank, world
    return 0, 1


def first_failure(reason: str, world: int) -> str:
    """reason: why this process must stop ("" if it need not): it could not read its batch for the step, a data
    folder was prepared again while the run read it, or another run holds the --out folder. Returns the first
    process's reason among those that failed, or "", the same on every process: with several, one that stops alone
    leaves the others waiting in the step's all-reduce until torchrun kills them, so the steps since the last
    checkpoint, which the first process would have saved, are lost. A small all-reduce of a CPU tensor each step (over
    gloo: no wait for the GPU); the reasons are gathered only when one failed."""
    if world == 1:
        return reason
    failed = torch.tensor([int(bool(reason))])
    dist.all_reduce(failed)
    if not failed.item():
        return ""
    reasons = [None] * world
    dist.all_gather_object(reasons, reason)
    return next(r for r in reasons if r)


def end_process_group():
    """torchrun's processes leave the group together: each waits at a barrier until every one is past its last
    collective, then tears the group down. Torn down while another process's last collective was still in flight,
    gloo's threads could outlive it, and once (1 run of many, an --eval-only under the test suite) a process was
    aborted on exit ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume

def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
