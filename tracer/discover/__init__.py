"""Interpreter discovery: the image, its symbols, its struct layouts and the probe sites."""
