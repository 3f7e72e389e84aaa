"""Write the TensorFlow fixtures that tests/test_tf_checkpoint.py and tests/test_convert.py read without TensorFlow
(through tests/tf_fixtures.py). Not run by CI; regenerate with

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy    # was: tensorflow-cpu 2.21.0
    TF_ENABLE_ONEDNN_OPTS=0 /tmp/tfenv/bin/python tests/make_tf_fixture.py [autoregressive] [bert] [partitioned]

(no names: all three). A fixture rewritten differs from the committed one in the last bits of its floats (TensorFlow's
sums are not bitwise reproducible), so rewrite only the one that changes.

It writes, under tests/fixtures/:
- tf/model.ckpt-1000000.index and .data-0000{0,1,2}-of-00003: a tiny iGPT (n_px 5, 16 colours, n_embd 16,
  2 heads, 2 layers, 3 classes) laid out like the release: variables under model/, saved by Saver(sharded=True)
  with one data file per device (the model sits on two CPU devices; global_step, placed on none, gets the third),
  Adam slots, beta powers and global_step beside them, after two Adam steps so no slot is all zeros, and a few
  variables of other dtypes under extra/;
- tf_golden.npz: input tokens, the logits of a forward pass of the original math written in TensorFlow below,
  the classifier logits, and the values of the extra/ variables;
- tf_bert/model.ckpt-1000000.*: the same tiny model trained with the BERT objective, laid out like the release's
  igpt-*-bert checkpoints (no model/sos and no classifier; sharded, with Adam slots, after two Adam steps of the
  original's BERT loss on random masks), and tf_bert_golden.npz: tokens, a fixed mask (True = masked) with a
  different number of masked positions in each image, and the logits and loss of TensorFlow's forward pass of the
  original BERT math under that mask;
- tf_partitioned/model.ckpt.*: a checkpoint holding a partitioned variable, which the reader must refuse.
"""
import os
import shutil
import sys

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
N_PX, N_VOCAB, N_EMBD, N_HEAD, N_LAYER, N_CLASSES = 5, 16, 16, 2, 2, 3
D_HEAD, T = N_EMBD // N_HEAD, N_PX * N_PX


def normal(std):
    return tf1.random_normal_initializer(stddev=std)


def gain():
    return tf1.random_normal_initializer(mean=1.0, stddev=0.2)


def make_variables(bert=False):
    """The release's variable names and shapes; layer 0 on one CPU, the rest on another, so there are two shards.
    bert: the BERT models' set, without sos and without the classifier."""
    v = {}
    with tf1.variable_scope("model"), tf.device("/cpu:0"):
        v["wte"] = tf1.get_variable("wte", [N_VOCAB, N_EMBD], initializer=normal(0.5))
        v["wpe"] = tf1.get_variable("wpe", [T, N_EMBD], initializer=normal(0.3))
        if not bert:
            v["sos"] = tf1.get_variable("sos", [N_EMBD], initializer=normal(0.5))
        v["wtet"] = tf1.get_variable("wtet", [N_VOCAB, N_EMBD], initializer=normal(0.5))
        for i in range(N_LAYER):
            with tf1.variable_scope(f"h{i}"), tf.device(f"/cpu:{min(i, 1)}"):
                v[f"h{i}/ln_1/g"] = tf1.get_variable("ln_1/g", [N_EMBD], initializer=gain())
                for p in ("q_proj", "k_proj", "v_proj", "c_proj"):
                    v[f"h{i}/attn/{p}"] = tf1.get_variable(f"attn/{p}", [N_HEAD, D_HEAD, N_EMBD],
                                                           initializer=normal(N_EMBD ** -0.5))
                v[f"h{i}/ln_2/g"] = tf1.get_variable("ln_2/g", [N_EMBD], initializer=gain())
                v[f"h{i}/mlp/c_fc/w"] = tf1.get_variable("mlp/c_fc/w", [N_EMBD, 4 * N_EMBD], initializer=normal(0.2))
                v[f"h{i}/mlp/c_proj/w"] = tf1.get_variable("mlp/c_proj/w", [4 * N_EMBD, N_EMBD],
                                                           initializer=normal(0.2))
        with tf.device("/cpu:1"):
            v["ln_f/g"] = tf1.get_variable("ln_f/g", [N_EMBD], initializer=gain())
            if not bert:
                v["clf/wclf"] = tf1.get_variable("clf/wclf", [N_CLASSES, N_EMBD], initializer=normal(0.5))
    return v


def forward(v, X, keep=None):
    """The original model's math: gain-only norm, per-head projection tensors, x*sigmoid(1.702x), sos shift; or
    with keep (float [B, T], 0 at the masked positions, the original's M) its BERT math: the token embeddings
    multiplied by keep, no sos, no causal mask."""
    def norm(x, g):
        return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + 1e-5) * g

    B = X.shape[0]
    h = tf.gather(v["wte"], X)
    if keep is None:
        h = tf.concat([tf.ones([B, 1, N_EMBD]) * v["sos"], h[:, :-1]], axis=1) + v["wpe"][None]
        causal = tf.linalg.band_part(tf.ones([T, T]), -1, 0)
    else:
        h = h * keep[:, :, None] + v["wpe"][None]
        causal = tf.ones([T, T])
    for i in range(N_LAYER):
        x = norm(h, v[f"h{i}/ln_1/g"])
        q, k, val = (tf.einsum("bsf,hef->bhse", x, v[f"h{i}/attn/{p}"]) for p in ("q_proj", "k_proj", "v_proj"))
        w = tf.matmul(q, k, transpose_b=True) * tf.math.rsqrt(float(D_HEAD))
        w = tf.nn.softmax(w * causal - 1e10 * (1 - causal), axis=-1)
        h = h + tf.einsum("bhse,hef->bsf", tf.matmul(w, val), v[f"h{i}/attn/c_proj"])
        m = tf.einsum("bsf,fn->bsn", norm(h, v[f"h{i}/ln_2/g"]), v[f"h{i}/mlp/c_fc/w"])
        h = h + tf.einsum("bsn,nf->bsf", m * tf.sigmoid(1.702 * m), v[f"h{i}/mlp/c_proj/w"])
    h = norm(h, v["ln_f/g"])
    gen_logits = tf.einsum("bsf,vf->bsv", h, v["wtet"])
    if keep is not None:
        return gen_logits, None
    clf_logits = tf.matmul(tf.reduce_mean(h, axis=1), v["clf/wclf"], transpose_b=True)
    return gen_logits, clf_logits


def bert_loss(X, gen_logits, keep):
    """The original's BERT loss: cross-entropy at the masked positions, averaged per image, then over images."""
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=X, logits=gen_logits)
    masked = 1.0 - keep
    return tf.reduce_mean(tf.reduce_sum(ce * masked, axis=1) / tf.reduce_sum(masked, axis=1))


def fresh(folder):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return folder


def write_model():
    rng = np.random.RandomState(0)
    X = rng.randint(0, N_VOCAB, size=(2, T)).astype(np.int64)
    Y = np.eye(N_CLASSES, dtype=np.float32)[[0, 2]]
    extras = {"f16": (np.arange(6).reshape(2, 3) / 8 - 0.3).astype(np.float16),
              "bf16": np.array([1.5, -2.25, 3.0e-3, 65280.0], np.float32),  # all exact in bfloat16 but 3e-3
              "i32": np.array([[-7, 0], [2**31 - 1, -2**31]], np.int32),
              "i64": np.array([2**40 + 3, -5], np.int64)}
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(0)
        v = make_variables()
        step = tf1.train.get_or_create_global_step()
        with tf1.variable_scope("extra"), tf.device("/cpu:1"):
            ex = {k: tf1.get_variable(k, initializer=tf.constant(a, dtype=tf.bfloat16 if k == "bf16" else None),
                                      trainable=False) for k, a in extras.items()}
        gen_logits, clf_logits = forward(v, tf.constant(X))
        loss = (tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=X, logits=gen_logits))
                + tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=Y, logits=clf_logits)))
        train = tf1.train.AdamOptimizer(1e-2).minimize(loss, global_step=step)
        saver = tf1.train.Saver(sharded=True)
        with tf1.Session(graph=graph, config=tf1.ConfigProto(device_count={"CPU": 2})) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(2):
                sess.run(train)
            logits, clf, ex_values = sess.run([gen_logits, clf_logits, ex])
            prefix = saver.save(sess, os.path.join(fresh(os.path.join(HERE, "tf")), "model.ckpt-1000000"),
                                write_meta_graph=False)
    os.remove(os.path.join(HERE, "tf", "checkpoint"))  # the Saver's note of its latest save; not needed
    ex_values["bf16"] = ex_values["bf16"].astype(np.float32)
    np.savez(os.path.join(HERE, "tf_golden.npz"), tokens=X, logits=logits, clf_logits=clf, **ex_values)
    print("wrote", prefix, sorted(os.listdir(os.path.dirname(prefix))))


def write_bert_model():
    rng = np.random.RandomState(3)  # a seed whose mask hides 4, 6 and 1 positions
    X = rng.randint(0, N_VOCAB, size=(3, T)).astype(np.int64)
    mask = rng.uniform(size=(3, T)) <= 0.15  # the original keeps the positions whose uniform draw exceeds 0.15
    mask[:, 0] = True
    assert len(set(mask.sum(1))) == 3, "the fixed mask should hide a different number of positions in each image"
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(3)
        v = make_variables(bert=True)
        step = tf1.train.get_or_create_global_step()
        X_tf = tf.constant(X)
        random_keep = tf.cast(tf.greater(tf1.random.uniform([3, T]), 0.15), tf.float32)  # as in training
        train = tf1.train.AdamOptimizer(1e-2).minimize(bert_loss(X_tf, forward(v, X_tf, random_keep)[0], random_keep),
                                                        global_step=step)
        keep = tf.constant((~mask).astype(np.float32))
        gen_logits = forward(v, X_tf, keep)[0]
        loss = bert_loss(X_tf, gen_logits, keep)
        saver = tf1.train.Saver(sharded=True)
        with tf1.Session(graph=graph, config=tf1.ConfigProto(device_count={"CPU": 2})) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(2):
                sess.run(train)
            logits, loss_value = sess.run([gen_logits, loss])
            prefix = saver.save(sess, os.path.join(fresh(os.path.join(HERE, "tf_bert")), "model.ckpt-1000000"),
                                write_meta_graph=False)
    os.remove(os.path.join(HERE, "tf_bert", "checkpoint"))
    np.savez(os.path.join(HERE, "tf_bert_golden.npz"), tokens=X, mask=mask, logits=logits, loss=loss_value)
    print("wrote", prefix, sorted(os.listdir(os.path.dirname(prefix))))


def write_partitioned():
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(0)
        tf1.get_variable("model/wte", [4, 2], partitioner=tf1.fixed_size_partitioner(2))
        saver = tf1.train.Saver()
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            prefix = saver.save(sess, os.path.join(fresh(os.path.join(HERE, "tf_partitioned")), "model.ckpt"),
                                write_meta_graph=False)
    os.remove(os.path.join(HERE, "tf_partitioned", "checkpoint"))
    print("wrote", prefix)


if __name__ == "__main__":
    tf1.disable_eager_execution()
    writers = {"autoregressive": write_model, "bert": write_bert_model, "partitioned": write_partitioned}
    for name in sys.argv[1:] or writers:
        writers[name]()
