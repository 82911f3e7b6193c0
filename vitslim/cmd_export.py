"""`vitslim export`: deployable artefacts of a preset, arch .yaml or checkpoint."""
import json

from .cli import STATE_DICT_ARCH_HELP, register_command


def _args(p):
    p.add_argument("target", help="preset name, arch .yaml, or checkpoint (official, timm, Hugging Face or vitslim)")
    p.add_argument("--format", required=True, choices=["yaml", "onnx", "coreml", "torchscript", "safetensors"])
    p.add_argument("--out", required=True, help="output path (.yaml, .onnx, .mlpackage, .pt/.ts, .safetensors)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the traced example (default 1)")
    p.add_argument("--input-size", type=int, default=None,
                   help="export at this input side (default: the arch's); trained weights must run at it")
    p.add_argument("--arch", default=None, metavar="ARCH", help=STATE_DICT_ARCH_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-check", action="store_true", help="skip comparing the artefact's outputs with PyTorch")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run(args):
    from .export import export
    target = args.target
    if args.arch is not None:  # the weights of a plain state dict, as the arch given
        from .api import load_checkpoint
        target, arch = load_checkpoint(args.target, arch=args.arch)
        target.arch = arch
    res = export(target, args.format, args.out, batch=args.batch, overwrite=args.overwrite,
                 check=not args.no_check, input_size=args.input_size)
    if args.json:
        print(json.dumps(res))
    else:
        extra = f" (max relative error {res['max_rel_error']:.1e} vs PyTorch)" if "max_rel_error" in res else ""
        print(f"wrote {res['path']}{extra}" + (f" and {res['checkpoint']}" if "checkpoint" in res else ""))
        if res.get("weights"):
            print(f"weights: {res['weights']} (beside {args.target})")
        elif not res["trained"] and args.format != "yaml":
            print(f"note: untrained (random, seed 0) weights: {args.target} is an architecture; export a checkpoint "
                  "for a trained network (right for latency measurement, not for accuracy)")
        if res.get("unchecked"):
            print(f"note: not checked: {res['unchecked']}; check it on the device (e.g. Xcode's performance report)")
        elif args.format == "coreml" and not res.get("predicted"):
            print("note: Core ML converted here (float16 compute); it runs only on macOS/iOS (check it there, e.g. "
                  "Xcode's performance report)")
    return 0


register_command("export", _args, _run, "write a network as arch .yaml (+ weights), ONNX, Core ML, TorchScript or safetensors",
                 "vitslim export efficientformer_l1 --format onnx --out l1.onnx\n"
                 "vitslim export run/model.pt --format coreml --out l1.mlpackage")
