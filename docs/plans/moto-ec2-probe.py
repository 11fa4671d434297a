import requests, sys, time
from moto.server import ThreadedMotoServer
srv = ThreadedMotoServer(port=5931, verbose=False); srv.start()
U="http://127.0.0.1:5931/"
H={"Authorization":"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=x","Content-Type":"application/x-www-form-urlencoded; charset=utf-8"}
def call(action, **p):
    d={"Action":action,"Version":"2016-11-15"}; d.update(p)
    r=requests.post(U,data=d,headers=H)
    return r
def show(title,r,n=1800):
    print("=====",title,r.status_code, r.headers.get("content-type")); print(r.text[:n])
tags={"TagSpecification.1.ResourceType":"instance","TagSpecification.1.Tag.1.Key":"keel:key","TagSpecification.1.Tag.1.Value":"wf1/step"}
r=call("RunInstances",ImageId="ami-12c6146b",InstanceType="t3.micro",MinCount="1",MaxCount="1",ClientToken="tok-1",**tags); show("run1",r,3000)
import re
iid=re.search(r"<instanceId>(i-[0-9a-f]+)</instanceId>",r.text).group(1)
r=call("RunInstances",ImageId="ami-12c6146b",InstanceType="t3.micro",MinCount="1",MaxCount="1",ClientToken="tok-1",**tags); 
print("run2 same token instance:", re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>",r.text), "first:",iid)
r=call("DescribeInstances",**{"InstanceId.1":iid}); show("describe by id",r,6000)
r=call("DescribeInstances",**{"Filter.1.Name":"tag:keel:key","Filter.1.Value.1":"wf1/step"}); print("tag filter ids", re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>",r.text), r.status_code)
r=call("DescribeInstances",**{"Filter.1.Name":"client-token","Filter.1.Value.1":"tok-1"}); show("client-token filter",r,600)
r=call("DescribeInstances",**{"Filter.1.Name":"instance-state-name","Filter.1.Value.1":"running"}); print("state filter", re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>",r.text), r.status_code)
r=call("DescribeInstances",**{"InstanceId.1":"i-0123456789abcdef0"}); show("describe unknown",r)
r=call("TerminateInstances",**{"InstanceId.1":"i-0123456789abcdef0"}); show("terminate unknown",r)
# volumes
r=call("CreateVolume",Size="8",AvailabilityZone="us-east-1a",ClientToken="vt",**{"TagSpecification.1.ResourceType":"volume","TagSpecification.1.Tag.1.Key":"keel:key","TagSpecification.1.Tag.1.Value":"v1"}); show("createvolume",r)
vid=re.search(r"<volumeId>(vol-[0-9a-f]+)</volumeId>",r.text).group(1)
r=call("DescribeVolumes",**{"VolumeId.1":vid}); show("describe vol",r)
r=call("AttachVolume",VolumeId=vid,InstanceId=iid,Device="/dev/sdf"); show("attach",r)
r=call("DescribeVolumes",**{"VolumeId.1":vid}); show("describe vol attached",r)
r=call("RunInstances",ImageId="ami-12c6146b",MinCount="1",MaxCount="1"); iid2=re.search(r"<instanceId>(i-[0-9a-f]+)</instanceId>",r.text).group(1)
r=call("AttachVolume",VolumeId=vid,InstanceId=iid2,Device="/dev/sdg"); show("attach to 2nd instance while attached",r)
r=call("AttachVolume",VolumeId="vol-0123456789abcdef0",InstanceId=iid,Device="/dev/sdh"); show("attach unknown vol",r)
r=call("AttachVolume",VolumeId=vid,InstanceId="i-0123456789abcdef0",Device="/dev/sdh"); show("attach unknown inst",r)
r=call("DeleteVolume",VolumeId=vid); show("delete attached",r)
r=call("DetachVolume",VolumeId=vid,InstanceId=iid); show("detach from iid (stale)",r)
r=call("DetachVolume",VolumeId=vid); show("detach no instance",r)
r=call("DescribeVolumes",**{"VolumeId.1":vid}); show("describe vol",r,800)
r=call("DeleteVolume",VolumeId=vid); show("delete",r)
r=call("DeleteVolume",VolumeId=vid); show("delete again",r)
r=call("DescribeVolumes",**{"VolumeId.1":vid}); show("describe deleted",r)
r=call("TerminateInstances",**{"InstanceId.1":iid}); show("terminate",r)
r=call("DescribeInstances",**{"InstanceId.1":iid}); print("after terminate:", re.findall(r"<name>(\w[\w-]*)</name>",r.text), r.status_code)
r=call("TerminateInstances",**{"InstanceId.1":iid}); show("terminate again",r,900)
r=call("RunInstances",ImageId="ami-12c6146b",InstanceType="bogus.type",MinCount="1",MaxCount="1"); show("bogus type",r,300)
r=call("RunInstances",ImageId="ami-doesnotexist",MinCount="1",MaxCount="1"); show("bogus ami",r,300)
srv.stop()
