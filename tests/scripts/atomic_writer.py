"""Writes one file over and over, atomically, until killed: `atomic_writer.py MODE PATH`.

- `bytes`:   atomic_write_bytes with two alternating contents of different sizes;
- `preset`:  HealingConfig.save(), alternating the default and aggressive presets;
- `journal`: a CrashJournal with a tiny size limit, so that it compacts (rewrites itself
             atomically) every few dozen records, with decisions in between.

Prints READY once the file exists. Loads the plugin's modules without the package's __init__ (which
imports torch and transformers) so that a launch takes a fraction of a second and a test can kill
many of them.
"""
import os
import sys
import types

A = b"A" * 200_000 + b"\nend of version A\n"
B = b"B" * 333_333 + b"\nend of version B\n"


def main(mode: str, path: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pkg = types.ModuleType("self_healing")  # the package without its __init__ (torch, transformers)
    pkg.__path__ = [os.path.join(root, "self_healing")]
    sys.modules["self_healing"] = pkg
    from self_healing.io import atomic_write_bytes

    i = 0
    if mode == "bytes":
        while True:
            atomic_write_bytes(path, A if i % 2 == 0 else B)
            if i == 0:
                print("READY", flush=True)
            i += 1
    elif mode == "preset":
        from self_healing.config import HealingConfig

        cfgs = [HealingConfig.default(), HealingConfig.aggressive()]
        while True:
            cfgs[i % 2].save(path)
            if i == 0:
                print("READY", flush=True)
            i += 1
    elif mode == "journal":
        from self_healing.journal import CrashJournal

        j = CrashJournal(path)
        j.max_bytes = 8 * 1024
        j.start({"max_steps": 10 ** 9, "config": {"nan_patience": 3}})
        print("READY", flush=True)
        while True:
            i += 1
            j.progress(i, 1.0 / i, 1.0, 1e-3)
            if i % 7 == 0:
                j.decision("event", event={"step": i, "failure": "nan_loss", "actions": ["skip_step"],
                                           "diagnosis": "loss is nan " + "x" * 200})
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
