"""pycuda.autoinit for the emulator: a context on the emulated device."""
from . import driver

driver.init()
device = driver.Device(0)
context = device.make_context()
