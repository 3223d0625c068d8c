"""ASE ``.traj`` files whose frames are whole. ASE's format counts a frame in its header only once the
frame is written, so a file cut in a frame reads as the frames before it, but ASE's ``close()``
writes what a half-written frame holds, completing it with whatever the file held (forces of
1e-321 were seen). Here an interrupt (Ctrl-C; SIGTERM, which the command line turns into one) waits
for the frame to end, and a failed frame (a full disk) closes the file without that final write."""
from __future__ import annotations

import contextlib
from typing import Optional

__all__ = ["deferred_interrupts", "WholeFrameTrajectory"]


@contextlib.contextmanager
def deferred_interrupts():
    """Hold Ctrl-C and SIGTERM (when Python handles them: the command line's SIGTERM is Ctrl-C) until
    the block ends, then hand each signal that came, once and in order, to its handler (which raises
    KeyboardInterrupt for Ctrl-C): a write that must not be cut is never interrupted half-way. When
    the block itself fails (a full disk), its error goes on and the held signals are dropped: the
    run stops either way, and the error says why. Outside the main thread, and for signals Python
    does not handle, nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held, old = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            old[sig] = handler
            signal.signal(sig, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    except BaseException:
        held.clear()
        raise
    finally:  # restored with both signals blocked: one arriving meanwhile waits for its own handler
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, list(old)) if hasattr(signal, "pthread_sigmask") else None
        try:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for signum in dict.fromkeys(s for s, _ in held):  # each signal once, in the order they came
        old[signum](signum, next(f for s, f in held if s == signum))  # may raise, as the signal would have


class WholeFrameTrajectory:
    """ASE's ``Trajectory(path, mode, atoms)`` for writing, each frame whole (the module docstring).
    ``write(atoms=None, **kw)``, ``set_description`` and ``len()``: what ASE's optimisers take as an open
    ``trajectory=`` (given a name they open the file for every frame, and a frame cut there is
    completed with garbage as it is closed); ``option`` names the file in errors (``--trajectory``)."""

    def __init__(self, path: str, mode: str = "w", atoms=None, option: str = "--trajectory"):
        from ase.io.trajectory import Trajectory

        self.path, self.option, self.frames = str(path), option, 0
        self.traj: Optional[object] = Trajectory(self.path, mode, atoms)

    def write(self, atoms=None, then=None, **kwargs) -> None:
        """Write a frame (ASE's ``write``); ``then()`` runs once it is whole, before a held interrupt
        is raised (the frame noted as written)."""
        if self.traj is None:
            raise RuntimeError(f"{self.option} {self.path}: a frame failed to write; the file ends on its "
                               f"{self.frames} whole frame(s)")
        with deferred_interrupts():
            try:
                self.traj.write(atoms, **kwargs)
            except BaseException as exc:
                self._abandon()
                if isinstance(exc, OSError) and exc.filename is None:  # a full disk names the file
                    raise OSError(exc.errno, exc.strerror, self.path) from exc
                raise
            self.frames += 1
            if then is not None:
                then()

    def set_description(self, description: dict) -> None:  # ASE's optimisers describe themselves
        if self.traj is not None:
            self.traj.set_description(description)

    def __len__(self) -> int:
        return len(self.traj) if self.traj is not None else self.frames

    def _abandon(self) -> None:
        """Close the file without ASE's final write (which would complete the half frame); its header
        still counts the whole frames, so the file reads as those."""
        traj, self.traj = self.traj, None
        fd = getattr(getattr(traj, "backend", None), "fd", None)
        try:
            if fd is not None:
                fd.close()  # the half frame's buffered bytes may fail to flush again: they are not wanted
        except OSError:
            pass

    def close(self) -> None:
        if self.traj is not None:
            self.traj.close()
            self.traj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
