"""`finetune <command>`: train (default), doctor, check-data, convert. Train flags mirror the config fields
(see finetune/config.py)."""
from __future__ import annotations

import argparse
import json
import sys

from finetune import check_data  # light: the tokenizer (and torch) load only when a check needs them
from finetune.config import FIELDS, _base_type, flag_name, resolve
from finetune.errors import UserError

COMMANDS = ("train", "doctor", "check-data", "convert")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (the default command)")
    for name, f in FIELDS.items():
        if _base_type(f) is bool:
            p.add_argument(flag_name(name), dest=name, action="store_const", const=True, default=None,
                           help=f.metadata["help"])
        else:
            p.add_argument(flag_name(name), dest=name, default=None, metavar=name.upper(), help=f.metadata["help"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="LoRA fine-tuning on the machine in front of you.")
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
        import backends
        from finetune import train

        given = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
        cfg, sources = resolve(given, known_backends=backends.names())
        return train.run(cfg, sources)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
