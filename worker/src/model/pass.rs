//! What one forward pass is: train or eval mode, and which batch-norm branch a
//! dual-batch-norm backbone (`resnet50_multi_bn`) normalises with.
//!
//! The reference (HSAT's `models/resnet_multi_bn_stl.py`, called from `train.py` and
//! `adv_eval_knn.py`) passes a branch name with every forward call: `"pgd"` while the
//! attack crafts its examples and for the adversarial forward of the outer
//! minimisation, `"normal"` for the clean forward and for every feature a k-NN
//! evaluation measures. Backbones with one batch norm per layer ignore the branch, so
//! the same [`Pass`] values drive every backbone.

/// The batch-norm branch of a dual-batch-norm backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BnBranch {
    /// Clean images (the branch a checkpoint's `backbone.safetensors` holds).
    Normal,
    /// Adversarial images: the attack's passes and the adversarial training forward.
    Pgd,
}

impl BnBranch {
    /// The reference's branch name (`bn_names=["normal", "pgd"]`).
    pub fn name(self) -> &'static str {
        match self {
            BnBranch::Normal => "normal",
            BnBranch::Pgd => "pgd",
        }
    }

    /// Index of the branch in the reference's `bn_list` (its state-dict names).
    pub fn index(self) -> usize {
        match self {
            BnBranch::Normal => 0,
            BnBranch::Pgd => 1,
        }
    }
}

/// One forward pass: the batch-norm mode and branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Train mode: batch norm normalises with batch statistics and updates its
    /// running statistics. Eval mode uses the running statistics.
    pub train: bool,
    /// The batch-norm branch (ignored by single-batch-norm backbones).
    pub branch: BnBranch,
}

impl Pass {
    /// Training forward of clean images.
    pub const TRAIN: Pass = Pass {
        train: true,
        branch: BnBranch::Normal,
    };
    /// Eval-mode forward of clean images (evaluation features).
    pub const EVAL: Pass = Pass {
        train: false,
        branch: BnBranch::Normal,
    };
    /// Training forward of adversarial images (the outer minimisation's `f(x_adv)`).
    pub const TRAIN_ADV: Pass = Pass {
        train: true,
        branch: BnBranch::Pgd,
    };
    /// The attack's forward passes: eval mode, adversarial branch (the reference
    /// calls `model.eval()` then `model(x + delta, 'pgd')`, in training and in its
    /// evaluation attacks alike).
    pub const ATTACK: Pass = Pass {
        train: false,
        branch: BnBranch::Pgd,
    };
}
