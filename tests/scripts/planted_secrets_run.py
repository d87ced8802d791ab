"""A real tiny SFT run with secrets planted everywhere a careless run would leak them:
`planted_secrets_run.py OUT SECRETS.json`.

Planted: the Trainer's `hub_token`; a token in `model_init_kwargs` (which the Trainer's trackio
integration copies into the run config, and `training_args.bin` pickles); HF/W&B/OpenAI tokens and
a password of no recognisable shape in the environment; credentials in a URL, a query-string key
and a bearer token inside exception messages -- a flaky reward API inside a step (retried), an OOM
(healed by the orchestrator, which writes a resume checkpoint) and finally a bug (an `exception`
postmortem with the traceback). Reports to trackio (local, offline). Logs at INFO to stderr. The
test then searches every file under OUT and TRACKIO_DIR, and this process's stdout/stderr, for
every planted value.
"""
import json
import logging
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)
import transformers  # noqa: E402

from self_healing import HealingConfig, SelfHealingTrainer  # noqa: E402
from self_healing.faults import Fault, inject_faults  # noqa: E402
from self_healing.tiny import build_trainer  # noqa: E402


def main(out: str, secrets_file: str) -> None:
    s = json.load(open(secrets_file))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("self_healing").setLevel(logging.INFO)
    transformers.logging.set_verbosity_info()
    trainer = build_trainer("sft", output_dir=out, max_steps=12, report_to="trackio", project="planted",
                            run_name="planted-run", hub_token=s["hub_token"], save_strategy="steps", save_steps=4,
                            logging_steps=1, model_init_kwargs={"token": s["vendor_key"]})
    url = f"https://bot:{s['url_password']}@rewards.example.com/v1/score?api_key={s['query_key']}"
    inject_faults(
        trainer,
        Fault("exception", step=3, times=1,
              exception=lambda: ConnectionError(f"POST {url} failed: 503 Service Unavailable")),
        Fault("exception", step=6, times=1, exception=lambda: torch.OutOfMemoryError(
            f"CUDA out of memory while calling {url} with Authorization: Bearer {s['bearer']}")),
        Fault("exception", step=10, times=1, exception=lambda: ZeroDivisionError(
            f"division by zero scoring with key {s['openai_key']} (wandb {s['wandb_key']}, hf {s['hf_token']})")),
    )
    sh = SelfHealingTrainer(trainer, HealingConfig(snapshot_every_steps=3, api_backoff_seconds=0.001))
    try:
        sh.train()
    except ZeroDivisionError:
        pass
    print(f"DONE {sh.exit_reason} {trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
