"""What every method builds on and the engine drives: the method interface (`stage`), the registries of
methods and compressed layer kinds (`registry`), the block-by-block calibration pass (`blocks`), and the
math that several families share (Hessians, channel statistics, the OBS sweep, masks, bit packing,
scale-moving transforms). Nothing here imports a method."""
