"""sampler stage of latentdit."""
