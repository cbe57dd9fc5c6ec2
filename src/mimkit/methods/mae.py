"""MAE pretraining: random 75% masking drawn per sample in the data view, pixel regression loss.

- He et al., Masked Autoencoders Are Scalable Vision Learners, 2021, arXiv:2111.06377
"""

from mimkit.config import PretrainConfig, check_model_kwargs
from mimkit.data.transforms import mae_view
from mimkit.models.mae import MAE, create_mae, num_kept
from mimkit.registry import LossFn, Method, View, register


def build_model(config: PretrainConfig) -> MAE:
    check_model_kwargs(MAE, config.model.kwargs)
    return create_mae(config.model.name, img_size=config.data.img_size, patch_size=config.model.patch_size,
                      in_chans=config.data.channels, norm_pix_loss=config.mae.norm_pix_loss,
                      **config.model.kwargs)


def build_task(config: PretrainConfig, model: MAE) -> tuple[View, LossFn]:
    mask_ratio = config.mae.mask_ratio
    num_kept(model.num_patches, mask_ratio)  # refuse an impossible ratio before training starts
    view = mae_view(config.data.img_size, config.data.mean, config.data.std, config.model.patch_size)

    def loss_fn(model: MAE, batch: dict):
        loss, _, _ = model(batch["image"], mask_ratio=mask_ratio, noise=batch["noise"])
        return loss, {}

    return view, loss_fn


register(Method("mae", "pretraining", build_model, build_task))
