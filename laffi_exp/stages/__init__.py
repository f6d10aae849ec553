"""The pipeline's stages, one module each: answer prediction, feedback annotation, LoRA training, evaluation."""
