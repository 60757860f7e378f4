"""The miniature world: seeded 32x32 scenes, a trained SD3-family base model, its judge and reward,
and RL fine-tunes that drift, small enough to build and study on 2 CPU cores.

- :mod:`ngdiag.world.scene`: the data (scenes and captions, a pure function of the seed);
- :mod:`ngdiag.world.judge`: the classifier that recognises a scene's factors;
- :mod:`ngdiag.world.build`: training the VAE, judge and base transformer, and assembling the pipeline.

The world's reward is the ``world:DIR`` reward spec (:class:`ngdiag.rewards.scorers.WorldReward`); its
quality measures are :mod:`ngdiag.quality`.
"""
