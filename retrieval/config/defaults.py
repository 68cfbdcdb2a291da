"""Every config key with its default and a one-line comment; YAML files and the command line
override these.

Keys whose value names an implementation are declared with ``_choice`` so that a value outside
the allowed set is rejected with the list of allowed values (see retrieval/config/loader.py).
"""

from __future__ import annotations

from yacs.config import CfgNode as CN

_C = CN()
# Allowed values of the keys that name an implementation: full key -> tuple of allowed values.
CHOICES: dict[str, tuple] = {}


def _choice(node: CN, prefix: str, key: str, default, allowed: tuple) -> None:
    """Declare ``node.key = default`` whose value must be one of ``allowed``."""
    setattr(node, key, default)
    CHOICES[f"{prefix}.{key}" if prefix else key] = allowed


# ---------------------------------------------------------------------------------------------- run
# Output directory of the run: logs, resolved config, checkpoints, features and results.
_C.OUTPUT_DIR = "output/run"
# Global random seed (each rank adds its rank).
_C.SEED = 0
# Deterministic algorithms (slower): torch.use_deterministic_algorithms and cudnn settings.
_C.DETERMINISTIC = False
# Device: "auto" = cuda when available else cpu; or "cpu", "cuda", "cuda:1".
_C.DEVICE = "auto"
# Paper table and row this config reproduces (informational; used by tools/make_table.py).
_C.TABLE = CN()
# Table identifier, e.g. "senet_S3" ("" when the config is not a table row).
_C.TABLE.NAME = ""
# Row label inside that table, as printed in the paper.
_C.TABLE.ROW = ""

# -------------------------------------------------------------------------------------------- model
_C.MODEL = CN()
# Architecture built by retrieval.modeling.build.build_model.
_choice(_C.MODEL, "MODEL", "ARCH", "senet", ("senet", "cvnet_global", "cvnet_rerank"))
# ResNet depth of the backbone.
_choice(_C.MODEL, "MODEL", "DEPTH", 50, (18, 34, 50, 101, 152))
# Channel order the network expects: BGR (official CVNet/SENet, pycls lineage) or RGB (torchvision).
_choice(_C.MODEL, "MODEL", "INPUT_FORMAT", "BGR", ("BGR", "RGB"))
# Full model weights to load (our checkpoint or an official .pyth); "" = none.
_C.MODEL.WEIGHTS = ""
# Local ImageNet checkpoint used to initialise the backbone; "" = random init (with a warning).
_C.MODEL.PRETRAINED = ""
# Format of MODEL.PRETRAINED: torchvision (RGB weights) or pycls (BGR weights, official lineage).
_choice(_C.MODEL, "MODEL", "PRETRAINED_FORMAT", "pycls", ("pycls", "torchvision"))
# Output dimension of the global FC ("whitening") layer.
_C.MODEL.REDUCTION_DIM = 2048
# Training init of the descriptor FC: default (PyTorch) or identity (REDUCTION_DIM = channels).
_choice(_C.MODEL, "MODEL", "FC_INIT", "default", ("default", "identity"))
# Initial (or fixed) GeM exponent.
_C.MODEL.GEM_P = 3.0
# Learn the GeM exponent (CVNet-Global: True, a checkpoint key) or fix it (SENet: False, no key).
_C.MODEL.GEM_TRAINABLE = False

# Self-similarity module of SENet (spec/senet.md §2.3, SENet supp. Tab. S3-S5).
_C.MODEL.SSM = CN()
# Similarity per channel (official) or one over all channels per neighbour (Tab. S3 "directly").
_choice(_C.MODEL.SSM, "MODEL.SSM", "SELF_SIMILARITY", "channelwise", ("channelwise", "direct"))
# Similarity of reduced features: cosine (L2-normalised, official) or plain dot product (Tab. S4).
_choice(_C.MODEL.SSM, "MODEL.SSM", "SIM", "cosine", ("cosine", "dot"))
# Fusion of structural embedding and visual feature: sum (official) or concatenation (Tab. S5).
_choice(_C.MODEL.SSM, "MODEL.SSM", "FUSION", "sum", ("sum", "concat"))
# Reduced channel count C' before the self-similarity.
_C.MODEL.SSM.MID_DIM = 256
# Neighbourhood window size K (odd).
_C.MODEL.SSM.UNFOLD_SIZE = 7
# Kernel size of the valid convolutions that encode the window (odd).
_C.MODEL.SSM.KERNEL_SIZE = 3
# Training init of the SSM: pycls (official init_weights) or identity (starts as the identity map).
_choice(_C.MODEL.SSM, "MODEL.SSM", "INIT", "pycls", ("pycls", "identity"))

# CVNet-Rerank (spec/cvnet.md §3, CVNet supp. Tab. S3-S7, S12).
_C.MODEL.RERANK = CN()
# Backbone feature correlated: res4 = f3 (official), res5 = f4, fuse = both (Tab. S5).
_choice(_C.MODEL.RERANK, "MODEL.RERANK", "FEATURE_LAYER", "res4", ("res4", "res5", "fuse"))
# Compressed channels C' of the per-scale 3x3 conv (Tab. S3).
_C.MODEL.RERANK.COMPRESS_DIM = 256
# Area ratios of the feature pyramid (Tab. S6); the spatial factor is sqrt(scale).
_C.MODEL.RERANK.SCALES = [0.25, 0.5, 1.0]
# Correlate every query scale with every key scale (True) or only equal scales (Tab. S12 "CSC").
_C.MODEL.RERANK.CROSS_SCALE = True
# 4D kernels of the correlation encoder: asymmetric (official) or symmetric (Tab. S7).
_choice(_C.MODEL.RERANK, "MODEL.RERANK", "KERNEL", "asymmetric", ("asymmetric", "symmetric"))
# Trained global model whose frozen backbone feeds the re-ranker ("" = MODEL.WEIGHTS).
_C.MODEL.RERANK.GLOBAL_WEIGHTS = ""

# --------------------------------------------------------------------------------------------- data
_C.DATA = CN()
# Root of the datasets (see datasets/README.md).
_C.DATA.ROOT = "datasets/data"
# DataLoader worker processes per rank.
_C.DATA.NUM_WORKERS = 4
# Skip unreadable images (counted and reported) instead of stopping at the first one.
_C.DATA.SKIP_UNREADABLE = False
# Fraction of unreadable training images above which training stops with an error.
_C.DATA.MAX_UNREADABLE_FRACTION = 0.01

# ----------------------------------------------------------------------------------------- training
_C.TRAIN = CN()
# Training list in GLDv2 format (landmark_id,images), relative to DATA.ROOT.
_C.TRAIN.CSV = "gldv2/train_clean.csv"
# Image folder with GLDv2's a/b/c/<id>.jpg layout, relative to DATA.ROOT.
_C.TRAIN.IMAGE_DIR = "gldv2/train"
# Square training crop size in pixels.
_C.TRAIN.IMG_SIZE = 512
# Global batch size (split over the ranks).
_C.TRAIN.BATCH_SIZE = 64
# Images per class in a batch (>1: in-batch positives for the contrastive loss; 1: plain shuffle).
_C.TRAIN.SAMPLES_PER_CLASS = 1
# Number of epochs.
_C.TRAIN.EPOCHS = 25
# Stop after this many iterations (0 = run all epochs); used by quick runs and tests.
_C.TRAIN.MAX_ITERS = 0
# Gradient accumulation steps per optimiser step.
_C.TRAIN.ACCUM_STEPS = 1
# Clip the global gradient norm to this value (0 = off).
_C.TRAIN.CLIP_GRAD_NORM = 15.0
# Log every N iterations.
_C.TRAIN.LOG_PERIOD = 20
# Save a checkpoint every N iterations (and at every epoch end).
_C.TRAIN.CHECKPOINT_PERIOD = 1000
# Evaluate on TEST.DATASETS every N epochs and after the last one (0 = never during training).
_C.TRAIN.EVAL_PERIOD = 0
# Resume automatically from the last checkpoint in OUTPUT_DIR.
_C.TRAIN.AUTO_RESUME = True
# Use SyncBatchNorm under DDP.
_C.TRAIN.SYNC_BN = False
# Mixed precision: off, bf16 or fp16 (fp16 uses a GradScaler); auto: bf16 where the device computes
# it natively (a GPU with bf16, else fp16; a CPU with AMX or AVX512-BF16), else off
# (retrieval/precision.py).
_choice(_C.TRAIN, "TRAIN", "AMP", "off", ("off", "bf16", "fp16", "auto"))
# Use the channels_last memory format (faster convolutions on recent GPUs).
_C.TRAIN.CHANNELS_LAST = False
# Keep BatchNorm in eval mode (frozen statistics, affine trained): tiny per-GPU batches, CPU DDP.
_C.TRAIN.FREEZE_BN = False
# Checkpoints kept in OUTPUT_DIR (older ones are deleted; 0 = keep all).
_C.TRAIN.CHECKPOINT_KEEP = 3

# Augmentation (random resized crop, colour jitter, flips).
_C.TRAIN.AUG = CN()
# Scale range of the random resized crop.
_C.TRAIN.AUG.CROP_SCALE = [0.2, 1.0]
# Aspect-ratio range of the random resized crop.
_C.TRAIN.AUG.CROP_RATIO = [0.75, 1.3333]
# Strength of brightness/contrast/saturation jitter (0 = off).
_C.TRAIN.AUG.COLOR_JITTER = 0.2
# Probability of a horizontal flip.
_C.TRAIN.AUG.HFLIP = 0.5

# ----------------------------------------------------------------------------------------- losses
_C.LOSS = CN()
# Classification loss L_cls: CurricularFace (papers), plain linear softmax (margin-free) or none.
_choice(_C.LOSS, "LOSS", "CLS", "curricularface", ("curricularface", "softmax", "none"))
# Angular margin m of CurricularFace.
_C.LOSS.CLS_MARGIN = 0.15
# Logit scale s: CurricularFace's, or the factor on the normalised descriptor for softmax.
_C.LOSS.CLS_SCALE = 30.0
# Label smoothing of the softmax classification loss.
_C.LOSS.LABEL_SMOOTHING = 0.0
# Weight of L_cls in the total loss.
_C.LOSS.CLS_WEIGHT = 0.5
# Contrastive loss L_con: momentum contrastive (CVNet supp. Eq. S3), SupCon (Eq. S2) or none.
_choice(_C.LOSS, "LOSS", "CON", "momentum", ("momentum", "supcon", "none"))
# Weight lambda of L_con in the total loss.
_C.LOSS.CON_WEIGHT = 0.5
# Queue size K of the contrastive memory (CVNet supp. Tab. S9: 576, 4608, 73728).
_C.LOSS.QUEUE_SIZE = 73728
# Momentum of the key encoder update.
_C.LOSS.MOMENTUM = 0.999
# Temperature tau of the contrastive loss.
_C.LOSS.TEMPERATURE = 0.0333
# Margin inside the contrastive similarity C(s, y) for positives (0 = plain cosine).
_C.LOSS.CON_MARGIN = 0.0

# -------------------------------------------------------------------------------------- optimiser
_C.OPTIM = CN()
# Optimiser.
_choice(_C.OPTIM, "OPTIM", "NAME", "sgd", ("sgd", "adamw"))
# Base learning rate (for the global batch size TRAIN.BATCH_SIZE).
_C.OPTIM.LR = 0.005
# SGD momentum.
_C.OPTIM.MOMENTUM = 0.9
# Weight decay.
_C.OPTIM.WEIGHT_DECAY = 1e-4
# Learning-rate schedule after warm-up.
_choice(_C.OPTIM, "OPTIM", "SCHEDULE", "cosine", ("cosine", "step"))
# Epochs at which the step schedule multiplies the rate by OPTIM.STEP_GAMMA.
_C.OPTIM.STEPS = [15, 20]
# Multiplier of the step schedule.
_C.OPTIM.STEP_GAMMA = 0.1
# Linear warm-up length in epochs (fractions allowed).
_C.OPTIM.WARMUP_EPOCHS = 1.0
# Learning rate at the start of the warm-up, as a fraction of OPTIM.LR.
_C.OPTIM.WARMUP_FACTOR = 0.1

# ------------------------------------------------------------------------------- re-ranker training
_C.RERANK_TRAIN = CN()
# CSV of overlapped positive pairs written by tools/select_pairs.py, relative to DATA.ROOT.
_C.RERANK_TRAIN.PAIRS_CSV = "gldv2/overlapping_pairs.csv"
# Hard-negative ratio r_H at the start and end of training, linear in between (CVNet supp. Tab. S1).
_C.RERANK_TRAIN.HARD_NEG_RATIO = [0.2, 1.0]
# Hide-and-Seek probability at the start and end of training (CVNet supp. Tab. S2).
_C.RERANK_TRAIN.HIDE_PROB = [0.0, 0.2]
# Hide-and-Seek grid size (cells per side).
_C.RERANK_TRAIN.HIDE_GRID = 4
# Geometry of the training images: square (TRAIN.AUG's random resized crop, squashed to
# TRAIN.IMG_SIZE^2) or native (aspect ratio kept, longer side at most TRAIN.IMG_SIZE, never
# upscaled; colour jitter only), the geometry of the test protocol's inputs.
_choice(_C.RERANK_TRAIN, "RERANK_TRAIN", "GEOMETRY", "square", ("square", "native"))
# Training query: the whole image (none) or its part that the positive shows (inliers: the box of
# the RANSAC inliers, query_box of the pairs CSV), as a test query is cropped to its landmark box.
_choice(_C.RERANK_TRAIN, "RERANK_TRAIN", "QUERY_CROP", "none", ("none", "inliers"))
# Margin added on each side of the inlier box, as a fraction of its width and height.
_C.RERANK_TRAIN.QUERY_CROP_MARGIN = 0.1
# Global-descriptor neighbours of other classes from which hard negatives are drawn.
_C.RERANK_TRAIN.HARD_NEG_POOL = 20
# Inlier count from which a same-class pair counts as overlapping (CVNet supp. S1).
_C.RERANK_TRAIN.MIN_INLIERS = 30
# Same-class nearest neighbours verified per image during pair selection.
_C.RERANK_TRAIN.NUM_NEIGHBORS = 10
# Keep classes with more than this many images in overlapping pairs.
_C.RERANK_TRAIN.MIN_CLASS_IMAGES = 10
# CSV of hard-negative pools (query_id,negative_ids) from tools/select_pairs.py, under DATA.ROOT.
_C.RERANK_TRAIN.HARD_NEG_CSV = "gldv2/hard_negatives.csv"
# Classes per resumable work chunk of the pair selection.
_C.RERANK_TRAIN.CHUNK_CLASSES = 100
# Worker processes running RANSAC during pair selection (0 = in the main process).
_C.RERANK_TRAIN.RANSAC_WORKERS = 2

# ------------------------------------------------------------------------------------------- test
_C.TEST = CN()
# Test sets: revisitop names (roxford5k, rparis6k, any gnd_<name>.pkl folder) under DATA.ROOT.
_C.TEST.DATASETS = ["roxford5k", "rparis6k"]
# Append the R1M distractors (DATA.ROOT/revisitop1m) to every revisitop database.
_C.TEST.R1M = False
# Multi-scale factors of the global descriptor.
_C.TEST.SCALES = [0.7071, 1.0, 1.4142]
# Query crop: truncate (int() of the float bbx, official), round, or none.
_choice(_C.TEST, "TEST", "CROP", "truncate", ("truncate", "round", "none"))
# Images with a shorter side are upscaled to this size (recorded in the report).
_C.TEST.MIN_SIDE = 32
# Batch size of feature extraction (1 = official; >1 only batches equal-size images).
_C.TEST.BATCH_SIZE = 1
# Mixed precision of extraction and re-rank scoring on CUDA (CPU: bf16 re-rank scoring only, which
# is faster than fp32 only where the CPU has native bf16, AMX or AVX512-BF16).
_choice(_C.TEST, "TEST", "AMP", "off", ("off", "bf16", "fp16"))
# Reuse saved features when their metadata matches.
_C.TEST.CACHE_FEATURES = True
# Use the channels_last memory format for extraction on CUDA.
_C.TEST.CHANNELS_LAST = False
# Images per R1M extraction shard (a rerun resumes after the last finished shard).
_C.TEST.R1M_SHARD_SIZE = 10000
# Search backend: exact torch matmul, bf16/fp16 shortlist + exact re-score, or faiss flat.
_choice(_C.TEST, "TEST", "SEARCH", "torch_shortlist", ("torch", "torch_shortlist", "faiss"))
# Memory bound of one search chunk in MiB.
_C.TEST.SEARCH_CHUNK_MB = 1024
# Ranking depth kept for +R1M (full rankings are kept for the 5k/6k databases).
_C.TEST.R1M_TOPN = 10000
# Alpha query expansion (CVNet supp. Eq. S1); off when QE_N = 0.
_C.TEST.QE_N = 0
# Alpha exponent of the query expansion weights.
_C.TEST.QE_ALPHA = 3.0
# Alpha database augmentation neighbours (0 = off).
_C.TEST.DBA_N = 0
# Re-ranking depths K (empty = no re-ranking).
_C.TEST.RERANK_TOPK = []
# Shortlist rule: official (per protocol, skipping junk) or label_free (top-K of one ranking).
_choice(_C.TEST, "TEST", "RERANK_MODE", "official", ("official", "label_free"))
# Storage type of the cached compressed database pyramids of CVNet-Rerank (CVNet supp. Tab. S4).
_choice(_C.TEST, "TEST", "RERANK_CACHE_DTYPE", "float16", ("float32", "float16", "int8", "int4"))
# Build CVNet-Rerank's database pyramids in the scale-1 pass of the global extraction (no second
# backbone pass; the pyramids of all database images go to disk, not only the shortlisted ones).
# Applies when the global and re-rank backbones are equal, TEST.SCALES holds 1.0,
# TEST.CACHE_FEATURES is on and extraction runs in fp32; else pyramids are built when shortlisted.
_C.TEST.RERANK_SHARED_PASS = True
# CVNet-Rerank batches scored at once on CUDA, each from its own host thread and stream (cuDNN plans
# every new conv shape on the host, and each query brings new ones; cvnet/reranker.py). The CPU
# scores from one thread.
_C.TEST.RERANK_STREAMS = 4
# CVNet-Rerank on CUDA: round the 4D CNN's query and database grids up to a multiple of this many
# cells (4 = 128 px for res4 features), masked so the scores are unchanged (cvnet/padding.py):
# images of nearby sizes then share batches and conv shapes, so cuDNN plans fewer shapes. 1 = exact
# grids, the default: with 4 streams padding was slower (H100, ROxf stand-in: re-rank 37.6 s at 1,
# 50.0 s at 4, 50.6 s at 8; docs/benchmarks), measured under a fixed 4 GB TEST.RERANK_MEMORY_MB
# that cut padded batches the most; not yet measured under the automatic budget. From one stream it
# paid on first-seen shapes. The CPU always uses 1 (there padding only adds work).
_C.TEST.RERANK_PAD_MULTIPLE = 1
# CVNet-Rerank: database items scored together in one batch (fewer when TEST.RERANK_MEMORY_MB says
# so; only items of one pyramid size share a batch).
_C.TEST.RERANK_BATCH = 8
# CVNet-Rerank: memory (MiB) for the correlation volumes of the batches scored at once, all
# TEST.RERANK_STREAMS together; a batch is cut to fit. 0 = auto: half the GPU's free memory when
# the re-ranker is built on CUDA, 4096 on the CPU. (A fixed 4096 on an 80 GB H100 cut ROxf's batches
# to 2.5 items on average with 4 streams, against 4.7 uncut; docs/benchmarks.)
_C.TEST.RERANK_MEMORY_MB = 0
# Fusion weight: s_global + weight * s_rerank (CVNet: 0.5; Fig. S3).
_C.TEST.RERANK_WEIGHT = 0.5
# Re-ranker: cvnet (a CVNet-Rerank checkpoint) or gv (geometric verification with pydegensac).
_choice(_C.TEST, "TEST", "RERANKER", "cvnet", ("cvnet", "gv"))
# Re-ranker checkpoint (ours or official); "" = MODEL.WEIGHTS when MODEL.ARCH is cvnet_rerank.
_C.TEST.RERANK_WEIGHTS = ""
# Minimum inlier count of the geometric-verification re-ranker (CVNet supp. S4: 100).
_C.TEST.GV_MIN_INLIERS = 100
# GV local features: dense backbone locations (largest L2 norms) or cv2 SIFT (also pair selection).
_choice(_C.TEST, "TEST", "GV_LOCAL_FEATURES", "backbone", ("backbone", "sift"))
# Backbone feature map of the dense GV local features (detectron2 name).
_C.TEST.GV_FEATURE = "res4"
# Image scales of the dense GV local features (DELG style multi-scale).
_C.TEST.GV_SCALES = [0.7071, 1.0, 1.4142]
# Maximum number of GV local features per image (CVNet supp. S4: 1000).
_C.TEST.GV_MAX_FEATURES = 1000
# GV estimator: pydegensac homography (CVNet supp. S4) or scikit-learn RANSAC with an affine model.
_choice(_C.TEST, "TEST", "GV_ESTIMATOR", "degensac", ("degensac", "sklearn"))
# RANSAC inlier threshold in image pixels (reprojection distance).
_C.TEST.GV_PIXEL_THRESHOLD = 16.0
# RANSAC confidence (pydegensac).
_C.TEST.GV_CONFIDENCE = 0.999
# RANSAC iteration cap.
_C.TEST.GV_MAX_ITERS = 2000


def get_cfg() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()
