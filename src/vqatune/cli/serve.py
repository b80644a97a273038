"""`vqatune serve`: a local web page (Gradio) to ask the base and the tuned model about an image side
by side, and to explore the evaluate stage's predictions, per-category scores and plots.

Ask: the image goes through the prepare stage's decoding and resizing, the messages through
``prompts.build_messages`` and the answers through ``generation.generate_answers``; the tuned model
is loaded once as evaluation loads it (base + adapter) and the adapter is switched off for the
base answers, so the page answers exactly as the evaluate stage answered the same row.
Explore reads metrics/, plots/eval and data/processed only.

Binds 127.0.0.1 unless --host names another address and --allow-remote is given.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import sys
import time
from pathlib import Path
from typing import Optional

from ..config import ConfigError, load_params, section
from ..prompts import PROMPT_MODES, build_messages
from .ask import AskError, check_fits, check_question, context_length, image_size, load_image, load_settings

NO_MODEL = "No model yet ({what}): run `dvc repro` first."


class AskSession:
    """The tuned model (base + adapter) loaded once, and the settings evaluation used."""

    def __init__(self, base_dir: str, adapter_dir: str, params_path: Optional[str]):
        from ..evaluation.config import EvaluateConfig

        self.prompts, self.prepare, model_cfg = load_settings(params_path)
        params = load_params(params_path or "params.yaml") if (params_path or Path("params.yaml").is_file()) else {}
        self.cfg = section(params, "evaluate", EvaluateConfig)
        self.trust = model_cfg.trust_remote_code
        self.base_dir, self.adapter_dir = Path(base_dir), Path(adapter_dir)
        self.model = self.processor = None
        self.error: Optional[str] = None

    def load(self) -> None:
        """Load the model (or set ``error`` when its folders are missing), saying so on stdout."""
        for folder, marker in ((self.base_dir, "config.json"), (self.adapter_dir, "adapter_config.json")):
            if not (folder / marker).is_file():
                self.error = NO_MODEL.format(what=f"{folder / marker} not found")
                print(f"serve: {self.error}", flush=True)
                return
        import torch

        from ..models.loading import load_tuned_model, resolve_device

        print(f"serve: loading the model ({self.base_dir} + adapter {self.adapter_dir}) ...", flush=True)
        start = time.perf_counter()
        cfg = self.cfg
        if cfg.cpu_threads is not None and resolve_device(cfg.device) == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        self.model, self.processor = load_tuned_model(
            self.base_dir, self.adapter_dir, quantization=cfg.quantization, dtype=cfg.dtype,
            attn_implementation=cfg.attn_implementation, trust_remote_code=self.trust,
            device=cfg.device)
        print(f"serve: model loaded in {time.perf_counter() - start:.1f} s", flush=True)

    def answer(self, image_path: Optional[str], question: Optional[str], mode: str) -> tuple[str, str]:
        """(base answer, tuned answer); AskError with a one-line message for the page."""
        from ..generation.generate import generate_answers

        if self.model is None:
            raise AskError(self.error or NO_MODEL.format(what="not loaded"), 4)
        if not image_path:
            raise AskError("Upload or drop an image first.", 3)
        question = check_question(question, ": type one or pick a Kvasir-VQA question")
        if mode not in PROMPT_MODES:
            raise AskError(f"Unknown prompt mode {mode!r}.", 2)
        try:
            image = load_image(image_path, image_size(self.processor), self.prepare)
        except AskError as err:
            raise AskError(str(err).replace(str(image_path), Path(image_path).name)
                           + ": upload a png, jpg or other image file.", err.code) from err
        check_fits(self.processor, question, mode, self.prompts, image, context=context_length(self.model),
                   max_new_tokens=self.cfg.max_new_tokens)
        messages = [build_messages(question, mode, self.prompts)]
        answers = {}
        for name in ("base", "tuned"):
            # The base answers run the same weights with the adapter switched off, as evaluation does.
            off = self.model.disable_adapter() if name == "base" else contextlib.nullcontext()
            with off:
                answers[name] = generate_answers(
                    self.model, self.processor, messages, [image], batch_size=1,
                    max_new_tokens=self.cfg.max_new_tokens,
                    cache_implementation=self.cfg.cache_implementation)[0]
        return answers["base"], answers["tuned"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    if not is_loopback(args.host) and not args.allow_remote:
        print(f"vqatune serve: --host {args.host} is reachable from other machines; add "
              "--allow-remote to bind it", file=sys.stderr)
        return 2
    # Offline and private: no usage statistics, no update check.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .serve_app import build_app
    from .serve_explore import Evaluation

    session = AskSession(args.base, args.adapter, args.params)
    session.load()
    evaluation = Evaluation(args.metrics, args.data, args.plots)
    if evaluation.error:
        print(f"serve: {evaluation.error}", flush=True)
    app, theme = build_app(session, evaluation)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, theme=theme, show_error=False,
               inbrowser=False, prevent_thread_lock=True, quiet=True)
    print(f"serve: open {app.local_url} (Ctrl+C stops)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(sub) -> None:
    """Register ``serve`` on the ``vqatune`` subparsers."""
    serve = sub.add_parser("serve", help="a local web page: ask the models, explore the evaluation",
                           description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; others need --allow-remote)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a --host other machines can reach (no authentication!)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = a free one)")
    serve.add_argument("--base", default="models/base", help="the base model folder")
    serve.add_argument("--adapter", default="models/adapter", help="the LoRA adapter folder")
    serve.add_argument("--data", default="data/processed", help="the prepared dataset")
    serve.add_argument("--metrics", default="metrics", help="the evaluate stage's metrics folder")
    serve.add_argument("--plots", default="plots/eval", help="the evaluate stage's plots")
    serve.add_argument("--params", default=None,
                       help="params.yaml for prompts, images and generation (default: ./params.yaml)")
    serve.set_defaults(func=main)


def main(args) -> int:
    if args.port == 0:
        import socket

        with socket.socket() as s:
            s.bind((args.host if is_loopback(args.host) else "", 0))
            args.port = s.getsockname()[1]
    try:
        return run(args)
    except ConfigError as err:
        print(f"vqatune serve: {err}", file=sys.stderr)
        return 2
