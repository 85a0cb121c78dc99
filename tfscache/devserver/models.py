"""Example models for tests and the demo, in TF Serving's layout ``<base>/<name>/<version>/``.

``write_half_plus_two`` writes a SavedModel like TF Serving's own test model
``saved_model_half_plus_two_cpu``: ``y = a * x + b`` with predict, classify and regress
signatures (TF1 graph mode: TF2's ``tf.saved_model.save`` cannot give a signature the
classify/regress method names that TF Serving's Classify and Regress APIs require).

    python -m tfscache.devserver.models --out DIR --models 10 --versions 2
"""

from __future__ import annotations

import argparse
import os
import shutil

DELAY_FILE = os.path.join("assets.extra", "devserver_load_delay_seconds")
GATE_FILE = os.path.join("assets.extra", "devserver_load_gate")


def write_half_plus_two(base_path: str, name: str, version: int, a: float = 0.5, b: float = 2.0,
                        padding_bytes: int = 0) -> str:
    """Write the model; return its version directory. ``padding_bytes`` adds an unused float
    variable of about that size, so the copy and the restore take measurable time (benchmarks)."""
    import tensorflow as tf

    export_dir = os.path.join(base_path, name, str(version))
    if os.path.exists(export_dir):
        shutil.rmtree(export_dir)
    os.makedirs(os.path.dirname(export_dir), exist_ok=True)
    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph:
        a_var = v1.Variable(float(a), name="a", dtype=tf.float32)
        b_var = v1.Variable(float(b), name="b", dtype=tf.float32)
        if padding_bytes > 0:  # a Fill op in the graph, the bytes only in the checkpoint
            v1.Variable(tf.fill([padding_bytes // 4], 1.0), name="padding", dtype=tf.float32)
        # predict: x is one float per instance
        x = v1.placeholder(tf.float32, shape=[None], name="x")
        y = tf.add(tf.multiply(a_var, x), b_var, name="y")
        # a second predict signature with two inputs and two outputs (row vs columnar formats)
        z = v1.placeholder(tf.float32, shape=[None, 2], name="z")
        w = tf.add(tf.multiply(a_var, z), b_var, name="w")
        # classify / regress: serialized tf.Example with a float feature "x"
        serialized = v1.placeholder(tf.string, shape=[None], name="tf_example")
        parsed = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})
        y_ex = tf.add(tf.multiply(a_var, parsed["x"]), b_var, name="y_ex")
        sig = v1.saved_model.signature_def_utils
        signatures = {
            "serving_default": sig.predict_signature_def({"x": x}, {"y": y}),
            "two_inputs": sig.predict_signature_def({"x": x, "z": z}, {"y": y, "w": w}),
            "classify_x_to_y": sig.classification_signature_def(serialized, None, y_ex),
            "regress_x_to_y": sig.regression_signature_def(serialized, y_ex),
        }
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(export_dir)
            builder.add_meta_graph_and_variables(
                sess, [v1.saved_model.tag_constants.SERVING], signature_def_map=signatures,
                strip_default_attrs=True,
            )
            builder.save()
    return export_dir


def write_corrupt_model(base_path: str, name: str, version: int) -> str:
    """A version directory whose saved_model.pb is garbage: loading it fails."""
    export_dir = os.path.join(base_path, name, str(version))
    os.makedirs(os.path.join(export_dir, "variables"), exist_ok=True)
    with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
        f.write(b"this is not a SavedModel\x00\x01\x02")
    return export_dir


def set_load_delay(version_dir: str, seconds: float) -> None:
    """Make the DevServer's load of this version take ``seconds`` longer (a slow warmup).
    Real TF Serving ignores the file."""
    os.makedirs(os.path.join(version_dir, "assets.extra"), exist_ok=True)
    with open(os.path.join(version_dir, DELAY_FILE), "w") as f:
        f.write(f"{seconds}\n")


def hold_load(version_dir: str) -> None:
    """Make the DevServer's load of this version wait until ``release_load`` (a test decides
    when a load ends, instead of guessing a delay).  Real TF Serving ignores the file."""
    os.makedirs(os.path.join(version_dir, "assets.extra"), exist_ok=True)
    open(os.path.join(version_dir, GATE_FILE), "w").close()


def release_load(version_dir: str) -> None:
    os.remove(os.path.join(version_dir, GATE_FILE))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--versions", type=int, default=1)
    ap.add_argument("--prefix", default="model-")
    args = ap.parse_args(argv)
    for i in range(args.models):
        for v in range(1, args.versions + 1):
            write_half_plus_two(args.out, f"{args.prefix}{i}", v, a=0.5 + i, b=2.0 + v)
    print(f"wrote {args.models} models x {args.versions} versions into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
