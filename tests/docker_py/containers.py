# docker-py's tests/integration/api_network_test.py, the cases that need a container, ported to
# run as one script against fabric's Docker API (DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH
# set by the caller; REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE unset). The image is the `busybox`
# the caller imported (docker-py's BUSYBOX), the command `top` as upstream.
# Prints one line per case; exits 1 if any failed.
import sys
import uuid

import docker
from docker.types import IPAMConfig, IPAMPool

BUSYBOX = 'busybox'
client = docker.from_env().api
tmp_networks = []
tmp_containers = []
failed = []


def random_name():
    return 'dockerpytest_' + uuid.uuid4().hex[:12]


def create_network(*args, **kwargs):
    net_name = random_name()
    net_id = client.create_network(net_name, *args, **kwargs)['Id']
    tmp_networks.append(net_id)
    return (net_name, net_id)


def create_and_start(**kwargs):
    container = client.create_container(BUSYBOX, 'top', **kwargs)
    tmp_containers.append(container)
    client.start(container)
    return container


def raises(exc, f, *a, **k):
    try:
        f(*a, **k)
    except exc as e:
        return e
    raise AssertionError('%s did not raise %s' % (f.__name__, exc.__name__))


def test_connect_and_disconnect_container():
    net_name, net_id = create_network()
    container = create_and_start()
    network_data = client.inspect_network(net_id)
    assert not network_data.get('Containers'), network_data
    client.connect_container_to_network(container, net_id)
    network_data = client.inspect_network(net_id)
    assert list(network_data['Containers'].keys()) == [container['Id']], network_data
    raises(docker.errors.APIError, client.connect_container_to_network, container, net_id)
    client.disconnect_container_from_network(container, net_id)
    network_data = client.inspect_network(net_id)
    assert not network_data.get('Containers'), network_data
    raises(docker.errors.APIError, client.disconnect_container_from_network, container, net_id)


def test_connect_and_force_disconnect_container():
    net_name, net_id = create_network()
    container = create_and_start()
    client.connect_container_to_network(container, net_id)
    network_data = client.inspect_network(net_id)
    assert list(network_data['Containers'].keys()) == [container['Id']], network_data
    client.disconnect_container_from_network(container, net_id, True)
    network_data = client.inspect_network(net_id)
    assert not network_data.get('Containers'), network_data
    raises(docker.errors.APIError, client.disconnect_container_from_network,
           container, net_id, force=True)


def test_connect_on_container_create():
    net_name, net_id = create_network()
    container = create_and_start(
        host_config=client.create_host_config(network_mode=net_name))
    network_data = client.inspect_network(net_id)
    assert list(network_data['Containers'].keys()) == [container['Id']], network_data
    client.disconnect_container_from_network(container, net_id)
    network_data = client.inspect_network(net_id)
    assert not network_data.get('Containers'), network_data


def test_create_with_ipv4_address():
    # Upstream uses 132.124.0.0/16; fabric networks are private address space only (NAPI's
    # fabric rule), so the same case on 10.124.0.0/16.
    net_name, net_id = create_network(
        ipam=IPAMConfig(driver='default', pool_configs=[IPAMPool(subnet="10.124.0.0/16")]))
    container = create_and_start(
        host_config=client.create_host_config(network_mode=net_name),
        networking_config=client.create_networking_config({
            net_name: client.create_endpoint_config(ipv4_address='10.124.0.23')
        }))
    data = client.inspect_container(container)
    net = data['NetworkSettings']['Networks'][net_name]
    assert net['IPAMConfig']['IPv4Address'] == '10.124.0.23', net
    assert net['IPAddress'] == '10.124.0.23', net


def test_connect_with_ipv4_address():
    net_name, net_id = create_network(
        ipam=IPAMConfig(driver='default', pool_configs=[
            IPAMPool(subnet="172.28.0.0/16", iprange="172.28.5.0/24", gateway="172.28.5.254")]))
    container = create_and_start(
        host_config=client.create_host_config(network_mode=net_name))
    client.disconnect_container_from_network(container, net_name)
    client.connect_container_to_network(container, net_name, ipv4_address='172.28.5.24')
    data = client.inspect_container(container)
    net = data['NetworkSettings']['Networks'][net_name]
    assert net['IPAMConfig']['IPv4Address'] == '172.28.5.24', net


for name, f in list(globals().items()):
    if name.startswith('test_') and callable(f):
        try:
            f()
            print('ok   ' + name)
        except Exception as e:  # noqa: BLE001 - report every case
            failed.append(name)
            print('FAIL %s: %r' % (name, e))
        finally:
            for c in tmp_containers:
                try:
                    client.remove_container(c, force=True)
                except docker.errors.APIError:
                    pass
            del tmp_containers[:]
            for n in tmp_networks:
                try:
                    client.remove_network(n)
                except docker.errors.APIError:
                    pass
            del tmp_networks[:]
            client.leave_swarm(force=True)

sys.exit(1 if failed else 0)
