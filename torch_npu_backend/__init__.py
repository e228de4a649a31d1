"""The PyTorch backend of jaxgen, for Ascend NPUs through torch_npu, CUDA or CPU.

Not implemented yet: the device layer, the NPU attention dispatch and the torch twins of jaxgen's models
arrive with the PyTorch bridge. Nothing in jaxgen imports this package.
"""
