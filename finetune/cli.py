"""`finetune <command>`: train (default), doctor, check-data, convert. Train flags mirror the config fields
(see finetune/config.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from finetune import check_data  # light: the tokenizer (and torch) load only when a check needs them
from finetune.config import FIELDS, _base_type, flag_name, resolve
from finetune.errors import UserError
from finetune.world import Lost

COMMANDS = ("train", "doctor", "check-data", "convert", "runs", "chat", "export", "push", "jobs")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (the default command)")
    for name, f in FIELDS.items():
        text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help: "10% of" read as a %o conversion
        if _base_type(f) is bool:
            p.add_argument(flag_name(name), dest=name, action="store_const", const=True, default=None, help=text)
        else:
            p.add_argument(flag_name(name), dest=name, default=None, metavar=name.upper(), help=text)


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as ours: one `error:` line naming the command and the argument, exit code 2 (argparse
    prints its usage block first, which buries the line that matters)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="finetune", description="LoRA fine-tuning on the machine in front of you.")
    sub = parser.add_subparsers(dest="command")
    _train_parser(sub)
    doctor = sub.add_parser("doctor", help="what this machine has and which backend would run")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    convert = sub.add_parser("convert", help="convert a LoRA/DoRA adapter between mlx-lm and PEFT")
    convert.add_argument("adapter_dir", help="adapter directory (mlx-lm: adapters.safetensors; PEFT: adapter_model.safetensors)")
    convert.add_argument("--to", required=True, choices=("peft", "mlx"), help="format to write")
    convert.add_argument("--out", required=True, help="directory for the converted adapter")
    convert.add_argument("--base", default=None, help="base model id/path recorded in a PEFT adapter_config.json")
    check_data.add_arguments(sub.add_parser("check-data", help="which methods a dataset fits, its problems and stats"))
    runs = sub.add_parser("runs", help="run directories with their status, step reached, eval loss and resume command")
    runs.add_argument("root", nargs="?", default="outputs", help="folder holding run directories (default outputs)")
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    from finetune import chat, jobs

    chat.add_arguments(sub.add_parser("chat", help="talk to a trained adapter (streamed; --prompt for one answer)"))
    export = sub.add_parser("export", help="merged model folder, GGUF for llama.cpp / Ollama / LM Studio")
    export.add_argument("run_dir", nargs="?", help="a run directory")
    export.add_argument("--merge", action="store_true", help="write RUN_DIR/merged (base dtype)")
    export.add_argument("--gguf", action="append", default=[], metavar="TYPE",
                        help="f16, bf16, q8_0 or a K-quant such as q4_k_m (repeatable); also writes a Modelfile")
    export.add_argument("--out", default=None, help="output folder (default RUN_DIR/merged or RUN_DIR/gguf)")
    export.add_argument("--install-tools", action="store_true",
                        help="download and build llama.cpp's converter and quantizer now (~5 min, once)")
    push = sub.add_parser("push", help="upload a run to the Hugging Face Hub with a model card")
    push.add_argument("run_dir", help="a run directory")
    push.add_argument("--repo", required=True, help="user/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--what", default="adapter", choices=("adapter", "merged", "gguf"), help="what to upload")
    jobs.add_arguments(sub.add_parser("jobs", help="Hugging Face Jobs: list, status, logs, cancel, pull"))
    return parser


def doctor(as_json: bool) -> int:
    import backends
    from finetune import hardware

    hw = hardware.detect()
    status = {}
    for name in backends.names():
        try:
            status[name] = backends.get(name).available(hw) or "usable"
        except Exception as err:  # a broken third-party plugin must not break doctor
            status[name] = f"failed to load ({err})"
    try:
        chosen, why = backends.select("auto", hw, None, "sft")
        choice = {"backend": chosen.name, "device": chosen.device(hw), "why": why}
    except UserError as err:
        choice = {"backend": None, "device": None, "why": [str(err)]}
    if as_json:
        print(json.dumps({"hardware": hw.to_dict(), "backends": status, "choice": choice}, indent=2))
        return 0
    print("\n".join(hardware.summary_lines(hw)))
    print("Backends: " + ", ".join(f"{n} ({s})" for n, s in status.items()))
    print(f"Would train with: {choice['backend']} on {choice['device']} -- " + "; ".join(choice["why"]))
    return 0


def export_command(args) -> int:
    from finetune import export, llamacpp

    if args.install_tools:
        for path in llamacpp.install():
            print(f"ready: {path}")
        if not args.run_dir:
            return 0
    if not args.run_dir or not (args.merge or args.gguf):
        raise UserError("export needs a RUN_DIR and --merge and/or --gguf TYPE (e.g. --gguf q4_k_m)")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder that does not exist yet")
    quants = [export.check_quant(q) for q in args.gguf]  # every type checked before any work starts
    if args.merge:
        print(f"wrote {export.merge(args.run_dir, args.out if not quants else None)}")
    for q in quants:
        for path in export.gguf(args.run_dir, q, args.out):
            print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # under torchrun (finetune.launch): Pythons whose argparse keeps the separator
        argv = argv[1:]
    # CUDA: grow allocator segments instead of caching fixed blocks; 4-bit dequantization's odd-sized temporaries
    # otherwise left reserved memory 45% above the allocated peak on an H200 (a user's setting wins)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "doctor":
            return doctor(args.json)
        if args.command == "convert":
            from finetune import interop

            files = interop.convert(args.adapter_dir, args.to, args.out, args.base)
            print("wrote " + ", ".join(files))
            return 0
        if args.command == "check-data":
            return check_data.main(args)
        if args.command == "chat":
            from finetune import chat

            return chat.main(args)
        if args.command == "export":
            return export_command(args)
        if args.command == "push":
            from finetune import hub

            hub.push_run(args.run_dir, args.repo, args.what, args.private)
            return 0
        if args.command == "jobs":
            from finetune import jobs

            return jobs.main(args)
        if args.command == "runs":
            from finetune import runs

            found = runs.find(args.root)
            print(json.dumps(found, indent=2) if args.json else runs.format_table(found))
            return 0
        import backends

        given = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
        cfg, sources = resolve(given, known_backends=backends.names())
        if cfg.remote != "none":  # HF Jobs is a launcher, not a backend (finetune/remote.py)
            from finetune import remote

            return remote.train(cfg, sources)
        from finetune import train

        return train.run(cfg, sources, argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Lost as err:  # a distributed run's other process died before the steps began (it says why)
        print(f"error: another process of this distributed run stopped ({err})", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `finetune check-data x | head`: the reader stopped reading, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush is quiet too
        return 141  # 128 + SIGPIPE, as a shell reports it
