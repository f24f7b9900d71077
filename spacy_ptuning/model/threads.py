"""torch's threads in forked children: one intra-op thread after a fork.

Registered on import of ``model.backbone`` (so in every process that can
load a backbone), with ``os.register_at_fork``.
"""
import os

import torch


def single_threaded_after_fork() -> None:
    """In a forked child, limit torch to one intra-op thread.

    Why: torch's CPU wheels run intra-op parallelism on GNU OpenMP (libgomp,
    ``torch.__config__.parallel_info()``). libgomp keeps its worker threads in
    a pool owned by the thread that first opened a parallel region, and it
    has no fork handler: after ``fork()`` only the forking thread exists in
    the child, but the inherited pool still lists the parent's workers, so the
    child's first parallel region (a LayerNorm, a matmul over enough rows)
    waits forever on threads that do not exist. spaCy's
    ``nlp.pipe(n_process=...)`` starts its workers with multiprocessing's
    default start method, fork on Linux, after the parent has usually run the
    model (initialize, a first batch), so its workers hung. With one thread
    torch never opens a parallel region (``at::parallel_for`` runs inline
    when ``get_num_threads() == 1``; ``set_num_threads`` also sets OpenMP's
    and MKL's counts to 1), and the child runs. torch's own DataLoader does
    the same in its workers. One thread per worker is also the right size
    for n_process workers that already share the cores (n_process x
    threads would oversubscribe them). Spawned workers start a fresh
    interpreter and keep torch's default (set ``OMP_NUM_THREADS=1`` in the
    parent's environment before ``nlp.pipe`` to size them likewise).
    Registered on import, for every fork of a process that uses
    spacy-ptuning: which forks follow parallel torch work cannot be told from
    outside libgomp. A child whose parent never ran torch in parallel (a
    pre-fork server forking before any inference) may raise the count again
    with ``torch.set_num_threads``; after parallel work it would hang.
    """
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=single_threaded_after_fork)
