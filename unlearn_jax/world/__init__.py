"""The embedded world: a procedurally generated captioned world and everything built on it.

generator         -- the world: shapes x colours x sizes x backgrounds, captions and images.
tfds_builder      -- the same world as a TFDS dataset (`unlearn_jax_world`).
classifier        -- the world classifier: forget-rate classifier, FID features and
                     retain accuracy of the demo and of `eval.classifier=world_shape`.
embedded          -- where the shipped tiny SD model and classifier weights live (assets/).
pretrain          -- `python -m unlearn_jax.world.pretrain`: the four pretraining stages
                     (classifier, VAE, UNet + text encoder in `pretrain_diffusion`, the
                     generation check), written as a diffusers folder by `pretrain_export`.
demo/             -- `unlearn-jax demo`: protocol, runs, findings and report.
"""
